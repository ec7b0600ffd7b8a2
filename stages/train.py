"""Stage train: one head on one dataset's cached features -> model bundle (models/<dataset>/<head>.safetensors:
heads/bundle.py), metrics JSON, curves, confusion plot, dev and test predictions with class probabilities.
A head on a store of several encoder layers also writes the layer weights it learned (metrics.json's
`layer_weights`: the kept seed's, by hidden-state index; `layer_weights_per_seed`) and layer_weights.png."""
import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ercflow.check import load_checked_params
from heads.data import CachedDialogues
from heads.fit import fit_head, layer_weights, save_trained_head
from heads.trainer import selection_score
from pipeline.logs import run_stage
from pipeline.manifest import Manifest
from pipeline.metrics import mean_and_std, prediction_table
from pipeline.plots import plot_confusion, plot_layer_weights, plot_true_vs_predicted
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_checked_params(args.params)   # head options too: it builds a head
    hp = params.head(args.head)
    manifest = Manifest.load(f"data/manifest/{args.dataset}")
    stores = params.feature_stores(args.dataset, args.head)
    data = CachedDialogues(manifest, stores)
    runs = []   # (seed, head, result): one training run per seed
    for seed in params.seeds_for(args.head):
        trainer = dataclasses.replace(params.trainer_for(args.head), seed=seed)
        runs.append((seed, *fit_head(hp, trainer, data, log=log.info)))
    # the model kept is the best seed on dev (never test); the metrics are every seed's mean and std
    seed, head, result = max(runs, key=lambda r: selection_score(r[1], r[2].metrics["dev"]))
    save_trained_head(f"models/{args.dataset}/{args.head}.safetensors", args.head, hp, head, result, data, stores,
                      f"data/media/{args.dataset}.h5", dataset=args.dataset, seed=seed)

    out = Path(f"results/{args.dataset}/{args.head}")
    out.mkdir(parents=True, exist_ok=True)
    per_seed = {s: {split: {k: v for k, v in m.items() if k != "confusion"} for split, m in r.metrics.items()}
                for s, _, r in runs}
    summary = {"dataset": args.dataset, "head": args.head, "modalities": hp.modalities,
               "seeds": [s for s, _, _ in runs], "kept_seed": seed, "best_epoch": result.best_epoch,
               "seconds_per_epoch": round(float(np.mean([r.seconds_per_epoch for _, _, r in runs])), 3)}
    for split in result.metrics:
        summary[split], summary[f"{split}_std"] = mean_and_std([m[split] for m in per_seed.values()])
    summary["per_seed"] = per_seed
    if head.mixers:   # which encoder layers carry the emotion, as the heads learned to weigh them
        summary["layer_weights"] = layer_weights(head, data)
        summary["layer_weights_per_seed"] = {s: layer_weights(h, data) for s, h, _ in runs}
        plot_layer_weights(summary["layer_weights"], out / "layer_weights.png",
                           f"{args.head} on {args.dataset}: learned layer weights (seed {seed})")
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "curves.csv", pd.DataFrame(result.curves).to_csv(index=False))
    # the picture of the test split, or of dev where the dataset has no test rows (MELD from its train and dev
    # CSVs): confusion.png is a declared output, so it is always written
    shown = "test" if "test" in result.metrics else "dev"
    if hp.task == "categorical":
        plot_confusion(result.metrics[shown]["confusion"], manifest.meta.labels, out / "confusion.png",
                       f"{args.head} on {args.dataset} ({shown})")
    else:
        rows, raw = result.predictions[shown]
        dims = manifest.meta.dimensions
        plot_true_vs_predicted(manifest.rows.loc[rows, dims].to_numpy(np.float64), raw, dims,
                               out / "confusion.png", f"{args.head} on {args.dataset} ({shown})")
    for split in ("dev", "test"):
        rows, raw = result.predictions.get(split, (np.zeros(0, np.int64), np.zeros((0, head.n_out))))
        table = prediction_table(manifest.rows.loc[rows], raw, hp.task, manifest.meta.labels,
                                 manifest.meta.dimensions)
        atomic_write_text(out / f"predictions_{split}.csv", table.to_csv(index=False))
    test, std = summary.get("test", {}), summary.get("test_std", {})
    log.info(f"{args.head} on {args.dataset} ({len(runs)} seed(s)): test " +
             ", ".join(f"{k} {test[k]:.4f} ± {std[k]:.4f}" for k in ("wf1", "accuracy", "mean_r") if k in test))


if __name__ == "__main__":
    run_stage(main)
