"""ercflow's public face: the `ercflow` console script (ercflow/cli.py) and, later, load_model."""
from pipeline import __version__  # noqa: F401
