"""How the pipeline's cost grows with the data: the bundled synthetic sample at several sizes, each stage
run as its own process (as `dvc repro` runs it) in a temp project, measured per stage.

For each size (`sample.dialogues`; 60 is the demo's ~600 utterances, ~1,400 is MELD's size) the stages
make_sample, prepare, decode, extract (text_minilm, audio_egemaps, visual_c3d) and train (one head, a fixed
number of epochs so that its cost is comparable across sizes) run with the repository's params.yaml, the
size and the stage list changed. Per stage it prints the wall time, the CPU time (user + system, of the stage's processes: steadier than the
wall time on a machine shared with other work), utterances/s, the peak resident memory
(RSS) of the stage's processes and the size of what it wrote; then per stage the cost per utterance at the
largest size over that at the smallest, in wall and CPU time (1.0: linear; above: worse than linear; below: fixed costs amortised)
and the peak RSS ratio (a stage whose memory grows with the number of utterances shows a ratio well above 1).

Peak RSS: `rss max` is the kernel's high-water mark of the largest single process of the stage (wait4;
exact); `rss tree` is the largest sum over the stage's whole process tree (workers, torchrun ranks) seen by
sampling it every 50 ms with psutil (when installed; may miss a short spike).

    python bench/scale.py                          # 60 and 600 dialogues (1x, 10x)
    python bench/scale.py --dialogues 60,600,1400  # and MELD's size (~23x)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENCODERS = ["text_minilm", "audio_egemaps", "visual_c3d"]
HEAD = "fusion_mlp"


def stage_list(encoders: list[str], head: str | None) -> list[tuple[str, list[str], str]]:
    """(stage name, command arguments after `python -m`, output path) in pipeline order."""
    out = [("make_sample", ["stages.make_sample", "--out", "data/raw/sample"], "data/raw/sample"),
           ("prepare", ["stages.prepare", "--dataset", "sample"], "data/manifest/sample"),
           ("decode", ["stages.decode", "--dataset", "sample"], "data/media/sample.h5")]
    out += [(f"extract:{e}", ["stages.extract", "--dataset", "sample", "--encoder", e],
             f"data/features/sample/{e}.h5") for e in encoders]
    if head:
        out.append((f"train:{head}", ["stages.train", "--dataset", "sample", "--head", head],
                    f"models/sample/{head}.safetensors"))
    return out


def write_params(project: Path, dialogues: int, encoders: list[str], head: str | None, epochs: int) -> None:
    """The repository's params.yaml with the sample's size, the dataset and what runs changed."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sample"] = {**params.get("sample", {}), "dialogues": dialogues}
    params["datasets"] = ["sample"]
    params["extract"] = list(encoders)
    params["teachers"] = []
    params["train"] = [head] if head else []
    params["trainer"] = {**params.get("trainer", {}), "epochs": epochs, "patience": epochs}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_measured(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, int, int, int, str]:
    """(wall seconds, CPU seconds of the process and its reaped children, exit code, kernel max RSS of the
    largest process in bytes, sampled peak RSS of the process tree in bytes (0 without psutil), stderr tail)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    err = tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    tree_peak = 0
    while True:   # wait4, not Popen.poll (which would reap the child and lose its rusage)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if psutil is not None:
            try:
                root = psutil.Process(proc.pid)
                tree_peak = max(tree_peak, sum(_rss(p) for p in [root] + root.children(recursive=True)))
            except psutil.Error:
                pass
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    max_rss = int(usage.ru_maxrss) * 1024   # KiB on Linux
    err.seek(0)
    tail = err.read()[-2000:]
    err.close()
    return seconds, usage.ru_utime + usage.ru_stime, code, max_rss, tree_peak, tail


def _rss(p) -> int:
    try:
        return p.memory_info().rss
    except Exception:   # noqa: BLE001  (a worker that just ended)
        return 0


def measure(dialogues: int, encoders: list[str], head: str | None, epochs: int, keep: Path | None = None) -> list[dict]:
    """Run every stage on a sample of `dialogues` dialogues in a fresh temp project; one row per stage."""
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(keep or tmp)
        project.mkdir(parents=True, exist_ok=True)
        write_params(project, dialogues, encoders, head, epochs)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TQDM_DISABLE": "1", "ERCFLOW_LOG_LEVEL": "WARNING"}
        rows, n = [], None
        for name, args, output in stage_list(encoders, head):
            seconds, cpu, code, max_rss, tree, tail = run_measured([sys.executable, "-m", *args], project, env)
            if code != 0:
                raise SystemExit(f"{name} at {dialogues} dialogues failed (exit {code}):\n{tail}")
            if n is None and (project / "data/manifest/sample/manifest.csv").exists():
                n = sum(1 for _ in open(project / "data/manifest/sample/manifest.csv")) - 1
            rows.append({"dialogues": dialogues, "stage": name, "seconds": seconds, "cpu_seconds": cpu,
                         "max_rss": max_rss,
                         "tree_rss": tree, "output_bytes": size_of(project / output)})
        for r in rows:
            r["utterances"] = n
        return rows


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.0f}" if n else "-"


def report(rows: list[dict]) -> str:
    lines = [f"{'dialogues':>9s} {'utts':>6s} {'stage':24s} {'wall s':>8s} {'CPU s':>8s} {'utt/s':>8s} "
             f"{'rss max MiB':>11s} {'rss tree MiB':>12s} {'output MiB':>10s}"]
    for r in rows:
        lines.append(f"{r['dialogues']:9d} {r['utterances']:6d} {r['stage']:24s} {r['seconds']:8.1f} "
                     f"{r['cpu_seconds']:8.1f} {r['utterances'] / r['seconds']:8.1f} {mib(r['max_rss']):>11s} "
                     f"{mib(r['tree_rss']):>12s} {r['output_bytes'] / 2 ** 20:10.1f}")
    sizes = sorted({r["dialogues"] for r in rows})
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        by = {(r["dialogues"], r["stage"]): r for r in rows}
        lines.append("")
        n_lo, n_hi = by[(lo, rows[0]["stage"])]["utterances"], by[(hi, rows[0]["stage"])]["utterances"]
        lines.append(f"{hi} dialogues ({n_hi} utterances) over {lo} ({n_lo}), {n_hi / n_lo:.1f}x the utterances:")
        lines.append(f"{'stage':24s} {'wall/utt':>8s} {'CPU/utt':>8s} {'rss max':>8s} {'rss tree':>8s}")
        for stage in dict.fromkeys(r["stage"] for r in rows):
            a, b = by.get((lo, stage)), by.get((hi, stage))
            if a is None or b is None:
                continue
            per = {k: (b[k] / b["utterances"]) / (a[k] / a["utterances"]) if a[k] else float("nan")
                   for k in ("seconds", "cpu_seconds")}
            tree = f"{b['tree_rss'] / a['tree_rss']:8.2f}" if a["tree_rss"] and b["tree_rss"] else f"{'-':>8s}"
            lines.append(f"{stage:24s} {per['seconds']:8.2f} {per['cpu_seconds']:8.2f} "
                         f"{b['max_rss'] / a['max_rss']:8.2f} {tree}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dialogues", default="60,600", help="comma-separated sample sizes (sample.dialogues)")
    ap.add_argument("--encoders", default=",".join(ENCODERS), help="encoders of params.yaml to extract")
    ap.add_argument("--head", default=HEAD, help="head of params.yaml to train ('' for none)")
    ap.add_argument("--epochs", type=int, default=10, help="head epochs (fixed: no early stopping)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--keep", help="run in this folder (one size only) and keep it")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.dialogues.split(",")]
    encoders = [e for e in args.encoders.split(",") if e]
    if args.keep and len(sizes) > 1:
        ap.error("--keep takes one size")
    rows = []
    for d in sizes:
        t0 = time.perf_counter()
        rows += measure(d, encoders, args.head or None, args.epochs, Path(args.keep) if args.keep else None)
        print(f"# {d} dialogues: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(report(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
