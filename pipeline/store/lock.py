"""One writer per store (and per predict work dir): `writer_lock` takes `<target>.lock`; a second writer
waits for the first, naming it, or is refused (`StoreBusy`) with timeout 0."""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.store.files import StoreError

log = logging.getLogger(__name__)


class StoreBusy(StoreError):
    """Another process holds the writer lock of a store or work dir (and we were told not to wait)."""


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextmanager
def writer_lock(target: str | Path, timeout: float = -1):
    """Hold the writer lock of `target` (a store or a work dir): `<target>.lock` beside it, an OS file lock
    (released when the holder exits, even by kill -9), with the holder's pid, host and command written in it.
    A second writer logs who holds it and waits (`timeout` seconds; -1: as long as it takes), or raises
    `StoreBusy` naming the holder."""
    from filelock import FileLock, Timeout

    target = Path(target)
    lock_path = target.with_name(target.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _holder(lock_path)
        if timeout == 0:
            raise StoreBusy(f"{target}: being written by {holder}; wait for it to finish (or stop it), then run "
                            "again") from None
        log.info(f"{target}: being written by {holder}; waiting for it to finish")
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise StoreBusy(f"{target}: still being written by {holder} after {timeout:.0f} s; wait for it to "
                            "finish (or stop it), then run again") from None
    try:
        try:
            with open(lock_path, "r+") as fh:   # not truncated by a waiter: it opens the file without O_TRUNC
                fh.write(f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:200]}) "
                         f"since {time.strftime('%H:%M:%S')}")
                fh.truncate()
        except OSError:
            pass   # who holds it is a courtesy to the next writer, not the lock itself
        yield
    finally:
        lock.release()
