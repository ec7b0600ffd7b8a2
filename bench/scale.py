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

Each stage runs through DVC (`dvc repro --single-item <stage>` in a temp copy of the project, so the times
include DVC's hashing and caching of the outputs, as a user's run does). At the largest size it then measures:
- the feature-store read throughput of a head's training data: `pooled` of every store, and the ragged `seq`
  of the text store (`return_sequence: true` here) read row by row (`FeatureStore.sequence`) and in contiguous
  blocks (`FeatureStore.sequences`), each as MB/s against a raw sequential read of the same file (target >= 50%);
- `dvc repro` after one head's param edit (its dropout) as a fraction of the whole run (target <= 2%).

    python bench/scale.py                          # 60 and 600 dialogues (1x, 10x)
    python bench/scale.py --dialogues 60,600,1400  # and MELD's size (~23x)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENCODERS = ["text_minilm", "audio_egemaps", "visual_c3d"]
HEAD = "fusion_mlp"


def stage_list(encoders: list[str], head: str | None) -> list[tuple[str, str, str]]:
    """(row name, DVC stage, its output path) in pipeline order."""
    out = [("check", "check", "data/params.checked"),
           ("make_sample", "make_sample@sample", "data/raw/sample"),
           ("prepare", "prepare@sample", "data/manifest/sample"),
           ("decode", "decode@sample", "data/media/sample.h5")]
    out += [(f"extract:{e}", f"extract@sample-{e}", f"data/features/sample/{e}.h5") for e in encoders]
    if head:
        out += [(f"inputs:{head}", f"inputs@sample-{head}", f"data/inputs/sample/{head}.json"),
                (f"train:{head}", f"train@sample-{head}", f"models/sample/{head}.safetensors")]
    out.append(("report", "report", "reports"))
    return out


def write_params(project: Path, dialogues: int, encoders: list[str], head: str | None, epochs: int) -> None:
    """The repository's params.yaml with the sample's size, the dataset and what runs changed."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sample"] = {**params.get("sample", {}), "dialogues": dialogues}
    params["samples"] = ["sample"]
    params["datasets"] = ["sample"]
    params["extract"] = list(encoders)
    params["teachers"] = []
    params["train"] = [head] if head else []
    params["trainer"] = {**params.get("trainer", {}), "epochs": epochs, "patience": epochs, "seeds": [0]}
    if "text_minilm" in params["encoders"]:   # the ragged read below needs one store with `seq`
        params["encoders"]["text_minilm"]["return_sequence"] = True
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(project: Path) -> None:
    """A DVC project (no git) holding a copy of this repository's code and dvc.yaml."""
    for name in ("pipeline", "stages", "heads", "ercflow"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)


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


def measure(dialogues: int, encoders: list[str], head: str | None, epochs: int, keep: Path | None = None,
            extras: bool = False) -> tuple[list[dict], dict]:
    """Run every stage on a sample of `dialogues` dialogues in a fresh temp project; one row per stage, and
    with `extras` the read throughput and the cost of a re-run after a head's param edit."""
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(keep or tmp)
        project.mkdir(parents=True, exist_ok=True)
        make_project(project)
        write_params(project, dialogues, encoders, head, epochs)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONPATH": str(project), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TQDM_DISABLE": "1", "ERCFLOW_LOG_LEVEL": "WARNING"}
        rows, n = [], None
        for name, stage, output in stage_list(encoders, head):
            seconds, cpu, code, max_rss, tree, tail = run_measured(
                [sys.executable, "-m", "dvc", "repro", "-q", "--single-item", stage], project, env)
            if code != 0:
                raise SystemExit(f"{name} at {dialogues} dialogues failed (exit {code}):\n{tail}")
            if n is None and (project / "data/manifest/sample/manifest.csv").exists():
                n = sum(1 for _ in open(project / "data/manifest/sample/manifest.csv")) - 1
            rows.append({"dialogues": dialogues, "stage": name, "seconds": seconds, "cpu_seconds": cpu,
                         "max_rss": max_rss, "tree_rss": tree, "output_bytes": size_of(project / output)})
        for r in rows:
            r["utterances"] = n
        extra = {}
        if extras:
            extra["reads"] = read_throughput(sorted((project / "data/features/sample").glob("*.h5")))
            if head:
                extra["edit"] = rerun_after_edit(project, head, env, sum(r["seconds"] for r in rows))
        return rows, extra


def read_throughput(stores: list[Path], repeats: int = 3) -> list[dict]:
    """MB/s of reading each store's `pooled` (and `seq`: row by row as `FeatureStore.sequence` does, and in
    blocks as `FeatureStore.sequences` does) through FeatureStore, against a raw sequential read of the same
    file; each the best of `repeats` (the page cache warm after the first raw read: this compares the code
    paths, not the disk)."""
    import numpy as np

    from pipeline.store import FeatureStore

    def best(fn) -> tuple[float, int]:
        times, nbytes = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            nbytes = fn()
            times.append(time.perf_counter() - t0)
        return nbytes / min(times) / 1e6, nbytes

    def raw_read(path):
        n = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                n += len(chunk)
        return n

    out = []
    for path in stores:
        raw, _ = best(lambda: raw_read(path))
        with FeatureStore(path) as store:
            ids = store.utt_ids
            rows = [("pooled", lambda: store.pooled(ids).nbytes)]
            if store.has("seq"):
                rows += [("seq (row by row)", lambda: sum(np.asarray(store.sequence(u)).nbytes for u in ids)),
                         ("seq (sequences)", lambda: sum(v.nbytes for _, v in store.sequences(ids)))]
            for what, fn in rows:
                mbps, nbytes = best(fn)
                out.append({"store": path.name, "what": what, "mb": nbytes / 1e6, "mbps": mbps, "raw_mbps": raw})
    return out


def synthetic_seq_store(path: Path, rows: int, dim: int = 384, seed: int = 0) -> Path:
    """A feature store of `rows` utterances with a ragged `seq` of 5-60 tokens x `dim` (MiniLM-sized), written
    as extraction writes one (chunks, then assembly): `--reads-only` measures reads at any size without running
    the pipeline."""
    import numpy as np

    from pipeline.store import ChunkedRun, StoreLayout, assemble, chunk_bounds, ragged, run_chunks

    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 61, rows)
    run = ChunkedRun(path, "synthetic")

    def chunk(s, e):
        seqs = [rng.standard_normal((n, dim), dtype=np.float32) for n in lengths[s:e]]
        return {"pooled": np.stack([q.mean(0) for q in seqs]), "valid": np.ones(e - s, bool),
                **ragged(seqs, "seq", np.float32, (dim,))}, []

    run_chunks(run, rows, 256, chunk)
    assemble(run, [f"u{i}" for i in range(rows)], len(chunk_bounds(rows, 256)),
             StoreLayout(fixed=["pooled"], ragged=["seq"]), {"fingerprint": "synthetic"})
    return path


def rerun_after_edit(project: Path, head: str, env: dict, full_seconds: float) -> dict:
    """`dvc repro` after the head's dropout is edited in params.yaml: seconds, and the fraction of the run."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    options = params["heads"][head].setdefault("options", {})
    options["dropout"] = round(float(options.get("dropout", 0.1)) + 0.05, 3)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seconds, _, code, _, _, tail = run_measured([sys.executable, "-m", "dvc", "repro", "-q"], project, env)
    if code != 0:
        raise SystemExit(f"dvc repro after the edit failed (exit {code}):\n{tail}")
    return {"param": f"heads.{head}.options.dropout", "seconds": seconds, "full_seconds": full_seconds,
            "fraction": seconds / full_seconds}


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


def report_extras(extra: dict, dialogues: int) -> str:
    lines = []
    if extra.get("reads"):
        lines += ["", f"feature-store reads at {dialogues} dialogues (MB/s; raw = sequential read of the file):",
                  f"{'store':22s} {'what':20s} {'MB':>8s} {'MB/s':>8s} {'raw MB/s':>9s} {'share':>6s}"]
        for r in extra["reads"]:
            lines.append(f"{r['store']:22s} {r['what']:20s} {r['mb']:8.1f} {r['mbps']:8.0f} {r['raw_mbps']:9.0f} "
                         f"{r['mbps'] / r['raw_mbps']:6.0%}")
    if extra.get("edit"):
        e = extra["edit"]
        lines += ["", f"dvc repro after editing {e['param']}: {e['seconds']:.1f} s = {e['fraction']:.1%} of the "
                      f"whole run ({e['full_seconds']:.0f} s)"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dialogues", default="60,600", help="comma-separated sample sizes (sample.dialogues)")
    ap.add_argument("--encoders", default=",".join(ENCODERS), help="encoders of params.yaml to extract")
    ap.add_argument("--head", default=HEAD, help="head of params.yaml to train ('' for none)")
    ap.add_argument("--epochs", type=int, default=10, help="head epochs (fixed: no early stopping)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--keep", help="run in this folder (one size only) and keep it")
    ap.add_argument("--reads-only", type=int, metavar="ROWS",
                    help="only the read throughput, on a synthetic MiniLM-sized store of ROWS utterances")
    args = ap.parse_args(argv)
    if args.reads_only:
        with tempfile.TemporaryDirectory() as tmp:
            store = synthetic_seq_store(Path(tmp) / "seq.h5", args.reads_only)
            print(report_extras({"reads": read_throughput([store])}, 0).replace(" at 0 dialogues",
                                                                                 f" ({args.reads_only} rows)"))
        return
    sizes = [int(s) for s in args.dialogues.split(",")]
    encoders = [e for e in args.encoders.split(",") if e]
    if args.keep and len(sizes) > 1:
        ap.error("--keep takes one size")
    rows, extra = [], {}
    for d in sizes:
        t0 = time.perf_counter()
        got, extra = measure(d, encoders, args.head or None, args.epochs,
                             Path(args.keep) if args.keep else None, extras=d == max(sizes))
        rows += got
        print(f"# {d} dialogues: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(report(rows))
    print(report_extras(extra, max(sizes)))
    if args.json:
        Path(args.json).write_text(json.dumps({"stages": rows, **extra}, indent=1))


if __name__ == "__main__":
    main()
