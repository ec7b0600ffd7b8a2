"""ercflow's public face: `load_model(path).predict(table)` for a trained head, and the `ercflow` command
line (ercflow/cli.py)."""
from pipeline import __version__

__all__ = ["Model", "__version__", "load_model"]


def __getattr__(name: str):
    # lazy: `import ercflow.check` (every train stage does) must not load the predict machinery
    if name in ("Model", "load_model"):
        from ercflow import model

        return getattr(model, name)
    raise AttributeError(f"module 'ercflow' has no attribute {name!r}")
