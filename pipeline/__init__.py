"""ercflow: run each encoder once into HDF5 feature stores, train light ERC heads on the cached tensors."""
__version__ = "0.1.0"
