"""Stage train: one head on one dataset's cached features -> model bundle (models/<dataset>/<head>.safetensors:
heads/bundle.py), metrics JSON, curves, confusion plot, dev and test predictions with class probabilities."""
import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ercflow.check import load_checked_params
from heads.data import CachedDialogues
from heads.fit import fit_head, save_trained_head
from pipeline.logs import run_stage
from pipeline.manifest import Manifest
from pipeline.metrics import plot_confusion, prediction_table
from pipeline.params import ParamsError
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)


def feature_stores(params, dataset: str, head: str) -> dict[str, str]:
    hp = params.head(head)
    chosen = {**params.features, **hp.features}
    missing = [m for m in hp.modalities if m not in chosen]
    if missing:
        raise ParamsError(f"features: no store chosen for modality {missing} (params `features` / heads.{head}.features)")
    return {m: f"data/features/{dataset}/{chosen[m]}.h5" for m in hp.modalities}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_checked_params(args.params)   # head options too: it builds a head
    hp = params.head(args.head)
    manifest = Manifest.load(f"data/manifest/{args.dataset}")
    stores = feature_stores(params, args.dataset, args.head)
    data = CachedDialogues(manifest, stores)
    head, result = fit_head(hp, params.trainer_for(args.head), data, log=log.info)
    save_trained_head(f"models/{args.dataset}/{args.head}.safetensors", args.head, hp, head, result, data, stores,
                      f"data/media/{args.dataset}.h5", dataset=args.dataset)

    out = Path(f"results/{args.dataset}/{args.head}")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"dataset": args.dataset, "head": args.head, "modalities": hp.modalities,
               "best_epoch": result.best_epoch, "seconds_per_epoch": round(result.seconds_per_epoch, 3)}
    for split, m in result.metrics.items():
        summary[split] = {k: v for k, v in m.items() if k != "confusion"}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "curves.csv", pd.DataFrame(result.curves).to_csv(index=False))
    if hp.task == "categorical" and "test" in result.metrics:
        plot_confusion(result.metrics["test"]["confusion"], manifest.meta.labels, out / "confusion.png",
                       f"{args.head} on {args.dataset} (test)")
    for split in ("dev", "test"):
        rows, raw = result.predictions.get(split, (np.zeros(0, np.int64), np.zeros((0, head.n_out))))
        table = prediction_table(manifest.rows.loc[rows], raw, hp.task, manifest.meta.labels,
                                 manifest.meta.dimensions)
        atomic_write_text(out / f"predictions_{split}.csv", table.to_csv(index=False))
    test = result.metrics.get("test", {})
    log.info(f"{args.head} on {args.dataset}: test " + json.dumps({k: test[k] for k in ("wf1", "accuracy", "mean_r")
                                                                 if k in test}))


if __name__ == "__main__":
    run_stage(main)
