"""How long each stage takes to start: `python -m <stage> --help` (the imports a stage does before its work),
against `python -c "import torch"` (the floor of every stage that touches a head or an encoder), median of
--repeat, in this command. A `dvc repro` runs one process per stage and item: on the demo (about 35 of them)
start-up is most of the time, so an import a stage does not need is paid dozens of times per run.
`--against DIR` times the same stages in another checkout (e.g. a `git worktree` of an older commit), the two
alternating so that a busy machine slows both alike, and prints the ratio. (`ercflow check` / `predict` parse
--help before importing anything: their rows show the CLI alone.)

    python bench/stage_startup.py
    python bench/stage_startup.py --repeat 5 --importtime        # and each stage's slowest imports
    git worktree add /tmp/old <commit> && python bench/stage_startup.py --against /tmp/old
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what dvc.yaml runs (`python -m ...`), and predict; the module whose imports --importtime lists
STAGES = {"ercflow check": "ercflow.check", "stages.prepare": "stages.prepare", "stages.decode": "stages.decode",
          "stages.extract": "stages.extract", "stages.finetune_text": "stages.finetune_text",
          "stages.inputs": "stages.inputs", "stages.train": "stages.train", "stages.report": "stages.report",
          "ercflow predict": "ercflow.predict"}


def walls(cmd: list[str], repeat: int, roots: list[Path]) -> list[float]:
    """Median wall time of `cmd` run in each of `roots` (`python -m` imports the project from the cwd),
    the roots taking turns."""
    times: list[list[float]] = [[] for _ in roots]
    for _ in range(repeat):
        for i, root in enumerate(roots):
            t = time.perf_counter()
            subprocess.run(cmd, cwd=root, capture_output=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def slowest_imports(module: str, n: int = 5) -> list[tuple[float, str]]:
    """The `n` slowest imports made directly by the stage's module tree (cumulative seconds, -X importtime)."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=ROOT,
                         capture_output=True, text=True).stderr
    rows = []
    for line in err.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2]
            if len(name) - len(name.lstrip()) <= 5:   # the module itself and two levels below it
                rows.append((int(parts[1]) / 1e6, name.strip()))
    return sorted(rows, reverse=True)[1:n + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--importtime", action="store_true")
    ap.add_argument("--against", type=Path, help="another checkout to time the same stages in")
    args = ap.parse_args()
    roots = [ROOT] + ([args.against.resolve()] if args.against else [])
    (floor,) = walls([sys.executable, "-c", "import torch"], args.repeat, [ROOT])
    print(f"{os.cpu_count()} CPU(s); median of {args.repeat}; baseline `import torch`: {floor:.2f} s\n")
    if args.against:
        print(f"| stage | this checkout (s) | {args.against} (s) | ratio | this / import torch |")
        print("|---|---|---|---|---|")
    else:
        print("| stage | start-up (s) | / import torch |")
        print("|---|---|---|")
    for stage, module in STAGES.items():
        t = walls([sys.executable, "-m", *stage.split(), "--help"], args.repeat, roots)
        if args.against:
            print(f"| `{stage}` | {t[0]:.2f} | {t[1]:.2f} | {t[1] / t[0]:.2f} | {t[0] / floor:.2f} |")
        else:
            print(f"| `{stage}` | {t[0]:.2f} | {t[0] / floor:.2f} |")
        if args.importtime:
            for secs, name in slowest_imports(module):
                print(f"|   {name} | {secs:.2f} | |")


if __name__ == "__main__":
    main()
