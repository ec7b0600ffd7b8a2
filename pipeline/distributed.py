"""One stage as N processes under torchrun: which rank this is, a gloo process group, barriers that time out
with a message naming the ranks and the files, and the relaunch of a stage under torchrun.

`extract` (pipeline/extract.py) uses it: rank 0 prepares the store's `.partial/` folder and lists the chunks
still to compute, every rank computes its share of them (a disjoint slice), and rank 0 waits until every
chunk file is there and assembles the store. The group is gloo on a CPU and on CUDA alike (it only carries a
barrier and the list of chunks; the model runs on the rank's own GPU, `LOCAL_RANK`).

A stage whose params ask for `procs: N > 1` and that is not yet under torchrun runs itself again as
`python -m torch.distributed.run --standalone --nproc-per-node N -m stages.<stage> <its arguments>`, so
`dvc repro` still runs one command per stage. torchrun ends every rank when one fails; finished chunks are
kept, so a re-run (with any number of processes) resumes.

Waiting is bounded by `ERCFLOW_DIST_TIMEOUT` seconds (default 1800): joining the group, the first barrier,
and, for rank 0, the time without any new chunk from the other ranks (so a long extraction never times out
while it makes progress, and a rank that hangs is named after that long).
"""
from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pipeline import UserError
from pipeline.errors import first_line

log = logging.getLogger(__name__)

TIMEOUT_ENV = "ERCFLOW_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0


class DistributedError(UserError, RuntimeError):
    """A rank that did not arrive, a group that could not form, a relaunch that failed (one line each)."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, items: list) -> list:
        """This rank's slice of `items` (every world-th, from its rank): disjoint, and together all of them."""
        return items[self.rank::self.world]

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world}"


def under_torchrun() -> bool:
    """True in a process torchrun (torch.distributed.run) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def ranks() -> Ranks:
    """This process's rank from torchrun's environment (a single process: rank 0 of 1)."""
    if not under_torchrun():
        return Ranks()
    env = os.environ
    try:
        world = int(env["WORLD_SIZE"])
        return Ranks(int(env["RANK"]), world, int(env.get("LOCAL_RANK", env["RANK"])),
                     int(env.get("LOCAL_WORLD_SIZE", world)))
    except (KeyError, ValueError) as e:
        raise DistributedError(f"torchrun's environment is incomplete or malformed ({e}): RANK, WORLD_SIZE, "
                               "LOCAL_RANK are needed") from e


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value.strip() else DEFAULT_TIMEOUT
    except ValueError:
        raise DistributedError(f"${TIMEOUT_ENV}: seconds, not {value!r}") from None


def join_group(r: Ranks) -> None:
    """Join the gloo process group of the torchrun ranks, once per process (a group that exists, made by a
    caller's own script, is used as it is). It lives until the process ends: re-forming a group in one
    process is fragile (a rank still leaving the old one resets the new one's connections)."""
    import torch.distributed as dist

    if not r.distributed or dist.is_initialized():
        return
    t = timeout_seconds()
    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=t))
    except Exception as e:   # noqa: BLE001  (torch raises RuntimeError / DistStoreError / TimeoutError ...)
        raise DistributedError(f"{r}: the {r.world} ranks did not all join the process group within {t:g} s "
                               f"({first_line(e)}); a rank failed or hangs before it (see its lines above), or "
                               f"raise ${TIMEOUT_ENV}") from e
    atexit.register(_leave_group)


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(r: Ranks, what: str) -> None:
    """Every rank waits here; after `timeout_seconds()` the ranks that did not arrive are named."""
    import torch.distributed as dist

    if not r.distributed:
        return
    t = timeout_seconds()
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=t), wait_all_ranks=True)
    except RuntimeError as e:
        raise DistributedError(f"{r}: {what}: not every rank arrived within {t:g} s ({first_line(e)}); "
                               f"a rank failed or hangs (see its lines above), or raise ${TIMEOUT_ENV}") from e


def broadcast(r: Ranks, obj, what: str):
    """Rank 0's `obj`, on every rank."""
    import torch.distributed as dist

    if not r.distributed:
        return obj
    box = [obj if r.main else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as e:
        raise DistributedError(f"{r}: {what}: rank 0 did not send it ({first_line(e)})") from e
    return box[0]


def wait_for_files(r: Ranks, files: dict[Path, int], what: str, poll: float = 0.2, progress=None,
                   sizes: dict[Path, int] | None = None) -> None:
    """Wait until every file in `files` (path -> the rank that writes it) exists. The clock restarts with
    each file that appears: it fails only after `timeout_seconds()` without any, naming the files and ranks
    still missing. `progress` (a tqdm bar) advances by `sizes[path]` (default 1) per file."""
    t = timeout_seconds()
    missing = {p: k for p, k in files.items()}
    last = time.monotonic()
    while missing:
        arrived = [p for p in missing if p.exists()]
        for p in arrived:
            del missing[p]
            if progress is not None:
                progress.update((sizes or {}).get(p, 1))
        if arrived:
            last = time.monotonic()
        elif time.monotonic() - last > t:
            late = sorted(set(missing.values()))
            names = ", ".join(p.name for p in sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
            raise DistributedError(
                f"{r}: {what}: no new file for {t:g} s; {len(missing)} still missing ({names}) from rank(s) "
                f"{late}: a rank failed or hangs (see its lines above); finished chunks are kept, re-run to "
                f"resume (or raise ${TIMEOUT_ENV} for chunks slower than that)")
        else:
            time.sleep(poll)


def bind_device(r: Ranks, device: str, where: str) -> None:
    """Before the model is built: on CUDA, rank r's `cuda` is GPU `LOCAL_RANK`; on a CPU, this rank keeps its
    own slice of the cores (and as many torch threads), so N ranks do not fight over every core."""
    if not r.distributed:
        return
    import torch

    if device.startswith("cuda:"):
        raise DistributedError(f"{where}.device: {device} puts every rank on one GPU; with procs > 1 use "
                               "`auto` or `cuda` (rank r uses GPU LOCAL_RANK)")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        if r.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"{where}.procs: {r.local_world} processes on CUDA need as many GPUs; this "
                                   f"machine has {torch.cuda.device_count()}")
        torch.cuda.set_device(r.local_rank)
        return
    if device == "cuda":
        raise DistributedError(f"{where}.device: cuda, but no GPU is visible")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= r.local_world:
        k = len(cores) // r.local_world
        mine = cores[r.local_rank * k:(r.local_rank + 1) * k]
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(len(mine))
    else:
        torch.set_num_threads(1)


def stage_ranks(module: str, argv: list[str] | None, procs: int, device: str, where: str, what: str) -> Ranks | None:
    """A stage's entry into ranks. With `procs` > 1 outside torchrun, the stage `module` runs again as `procs`
    ranks (`relaunch`) and None comes back (this process has nothing left to do). Otherwise: this process's
    ranks, in the process group, on its device (`where`: the params key named in device errors); ranks other
    than 0 log only warnings and errors, so a run speaks with one voice."""
    if procs > 1 and not under_torchrun():
        relaunch(module, sys.argv[1:] if argv is None else list(argv), procs, what)
        return None
    r = ranks()
    join_group(r)   # first: a rank slow to load its model is then named at the first barrier
    if not r.main:
        for name in ("pipeline", "stages"):
            logging.getLogger(name).setLevel(max(logging.getLogger(name).getEffectiveLevel(), logging.WARNING))
    bind_device(r, device, where)
    return r


def torchrun_command(module: str, argv: list[str], procs: int) -> list[str]:
    """The command that runs `python -m <module> <argv>` as `procs` ranks on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            "-m", module, *argv]


def relaunch(module: str, argv: list[str], procs: int, what: str) -> None:
    """Run this stage again as `procs` ranks under torchrun and wait; a failed run is one DistributedError."""
    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0))
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // procs)))   # torchrun's default would be 1
    cmd = torchrun_command(module, argv, procs)
    log.info(f"{what}: {procs} processes: {' '.join(cmd[1:])}")
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise DistributedError(f"{what}: the {procs} processes under torchrun failed (exit {code}; the failing "
                               "rank's error is above); finished chunks are kept: re-run the stage to resume")
