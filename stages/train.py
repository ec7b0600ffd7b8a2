"""Stage train: one head on one dataset's cached features -> model, metrics JSON, curves, confusion plot."""
import argparse
import csv
import json
from pathlib import Path

import torch

from heads import build_head
from heads.data import CachedDialogues
from heads.trainer import seed_everything, train_head
from pipeline.manifest import Manifest
from pipeline.metrics import plot_confusion
from pipeline.params import ParamsError, load_params
from pipeline.store import atomic_write_text


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
    params = load_params(args.params)
    hp = params.head(args.head)
    manifest = Manifest.load(f"data/manifest/{args.dataset}")
    data = CachedDialogues(manifest, feature_stores(params, args.dataset, args.head))
    n_out = len(manifest.meta.labels) if hp.task == "categorical" else len(manifest.meta.dimensions)
    trainer = params.trainer_for(args.head)
    seed_everything(trainer.seed)   # the head's initial weights come from the seed too, not only the batches
    head = build_head(hp.head, {m: data.dim(m) for m in hp.modalities}, n_out, hp.task, hp.options)
    result = train_head(head, data, trainer)

    model_path = Path(f"models/{args.dataset}/{args.head}.pt")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": result.best_state, "head": hp.head, "options": hp.options, "task": hp.task,
                "modalities": hp.modalities, "labels": manifest.meta.labels, "features": data.provenance},
               model_path.with_suffix(".tmp"))
    model_path.with_suffix(".tmp").replace(model_path)

    out = Path(f"results/{args.dataset}/{args.head}")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"dataset": args.dataset, "head": args.head, "modalities": hp.modalities,
               "best_epoch": result.best_epoch, "seconds_per_epoch": round(result.seconds_per_epoch, 3)}
    for split, m in result.metrics.items():
        summary[split] = {k: v for k, v in m.items() if k != "confusion"}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=1))
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result.curves[0]))
        w.writeheader()
        w.writerows(result.curves)
    if hp.task == "categorical" and "test" in result.metrics:
        plot_confusion(result.metrics["test"]["confusion"], manifest.meta.labels, out / "confusion.png",
                       f"{args.head} on {args.dataset} (test)")
    rows, preds = result.predictions.get("test", result.predictions["dev"])
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["utt_id", "prediction"])
        for r, p in zip(rows, preds):
            w.writerow([manifest.rows.at[int(r), "utt_id"],
                        manifest.meta.labels[int(p)] if hp.task == "categorical" else json.dumps(p.tolist())])
    test = result.metrics.get("test", {})
    print(f"{args.head} on {args.dataset}: test " + json.dumps({k: test[k] for k in ("wf1", "accuracy", "mean_r")
                                                                 if k in test}))


if __name__ == "__main__":
    main()
