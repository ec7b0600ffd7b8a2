"""What ercflow's errors about a file share: the exception's reason in one line (`first_line`), and the pickle
files it never reads (`PICKLE_SUFFIXES`: unpickling can run code). A leaf: it imports nothing of the project."""
from __future__ import annotations

from pathlib import Path

# weights, checkpoints and bundles in these formats are refused by name, never opened
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of `e`'s message (its type's name when it has none), at most `limit` characters: the
    first ones, or with a negative `limit` the last ones (where a decoder puts its reason)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line[:limit] if limit >= 0 else line[limit:]


def pickled_files(folder: str | Path) -> list[str]:
    """The names of the pickle files directly in `folder`, sorted."""
    return sorted(f.name for f in Path(folder).iterdir() if f.name.endswith(PICKLE_SUFFIXES))
