"""ercflow: run each encoder once into HDF5 feature stores, train light ERC heads on the cached tensors."""
__version__ = "0.1.0"


class UserError(Exception):
    """A mistake in the user's params or inputs, or a damaged file: the message says what and where, and
    stages and commands print it as one line (no traceback)."""
