"""`python -m ercflow ...`: the same as the `ercflow` console script."""
import sys

from ercflow.cli import main

sys.exit(main())
