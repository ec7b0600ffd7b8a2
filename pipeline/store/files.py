"""Store errors and safe file writes: `StoreError` (one line naming the file and what to do), disk-full
handling, atomic text writes and the guarded write of a store's temp file."""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import h5py

from pipeline import UserError, paths

class StoreError(UserError, RuntimeError):
    """A store, checkpoint or model bundle that is missing, damaged, foreign or could not be written.

    The message is one line naming the file, what is wrong and what to do."""


class DiskFullError(StoreError):
    """A write failed for lack of disk space (ENOSPC) or quota (EDQUOT)."""


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


_DISK_FULL_TEXT = tuple(os.strerror(n) for n in _DISK_FULL) + tuple(f"os error {n})" for n in _DISK_FULL)


def is_disk_full(e: BaseException | None) -> bool:
    """True for an OSError with errno ENOSPC/EDQUOT, or an error (safetensors', h5py's) whose message or
    cause says so."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if any(t in str(e) for t in _DISK_FULL_TEXT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def remove_path(path: Path) -> None:
    """Remove a temp file or directory (a symlink itself, never its target); absent is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def guarded_write(path: str | Path, tmp: str | Path | None = None, nbytes: int | None = None,
                  then: str = "re-run the stage"):
    """Around a write of `path` (through `tmp`): on any failure remove `tmp`; a full disk becomes one
    `DiskFullError` naming `path`, the size being written and what to do."""
    try:
        yield
    except BaseException as e:
        if tmp is not None:
            remove_path(Path(tmp))
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e):
            code = e.errno if isinstance(e, OSError) and e.errno in _DISK_FULL else errno.ENOSPC
            size = f" {'about ' if nbytes and nbytes > 4096 else ''}{_size(nbytes)}" if nbytes else ""
            where = Path(path).resolve().parent
            raise DiskFullError(f"{path}: disk full ({os.strerror(code)}) while writing{size}; free space on "
                                f"the disk holding {where} (`df -h {where}`), then {then}") from e
        raise


def what_to_do(path: str | Path, delete: str | Path | None = None) -> str:
    """How to get a good copy of a file the pipeline writes: the DVC output to pull, or what to delete (a
    `persist` output is not deleted by DVC before its stage runs) and the stage to re-run (pipeline/paths.py)."""
    out, stage = paths.writer(path)
    rerun = f"`dvc repro {stage}`" if stage else "the stage that writes it"
    return f"re-pull it with `dvc pull {out}`, or delete {delete or path} and re-run {rerun}"


def atomic_write_text(path: str | Path, text: str, *, then: str = "re-run the stage") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = text.encode()
    with guarded_write(path, tmp, len(data), then):
        tmp.write_text(text)
        os.replace(tmp, path)


class _ClosingFile:
    """`h5py.File(path, "w")` that never leaves HDF5 holding data it cannot write. HDF5 that meets a full disk
    while it flushes its caches (at close, or when a dataset handle is freed) goes on with a half-written file
    and can crash the interpreter (rc 139). So: no raw-data chunk cache (a failed chunk write is an exception
    where it happens, not an ignored one at a handle's release), and after any failed write the file's
    descriptor is pointed at /dev/null before the file is closed, so the close completes; the caller then
    removes the temp file and reports the full disk."""

    def __init__(self, path: Path):
        self.file = h5py.File(path, "w", rdcc_nbytes=0)
        try:
            self.fd = self.file.id.get_vfd_handle()
        except Exception:   # another driver: no descriptor to redirect
            self.fd = None

    def __enter__(self) -> h5py.File:
        return self.file

    def _to_null(self) -> None:
        if isinstance(self.fd, int):
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self.fd)
            finally:
                os.close(null)

    def __exit__(self, kind, e, tb):
        if e is not None:   # the file is being thrown away: let HDF5 finish it into /dev/null
            self._to_null()
        try:
            self.file.close()
        except Exception:
            self._to_null()
            try:
                self.file.close()
            except Exception:
                pass
            if e is None:
                raise
        return False


def check_free_space(path: Path, nbytes: int, then: str) -> None:
    """Refuse (`DiskFullError`) to start writing about `nbytes` at `path` where the disk has less free space:
    HDF5 is safest never meeting a full disk."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < nbytes + (1 << 20):
        where = path.resolve().parent
        raise DiskFullError(f"{path}: disk full ({os.strerror(errno.ENOSPC)}): writing about {_size(nbytes)} with "
                            f"{_size(free)} free; free space on the disk holding {where} (`df -h {where}`), "
                            f"then {then}")


def open_for_writing(path: str | Path) -> _ClosingFile:
    """A context manager giving `h5py.File(path, "w")`, closed safely even on a full disk (`_ClosingFile`)."""
    return _ClosingFile(Path(path))
