"""Stage report: one comparison of the heads params.yaml trains now, on each dataset -> reports/report.md (a
table: mean ± std over seeds, per-class F1), reports/report.json (every head's metrics) and reports/metrics.json
(the compact file DVC shows as the pipeline's metrics: `dvc metrics show`, `dvc exp show`)."""
import argparse
import json
import logging
from pathlib import Path

from pipeline.logs import run_stage
from pipeline.params import load_params
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)


def pm(split: dict, std: dict, key: str) -> str:
    return f"{split[key]:.4f} ± {std.get(key, 0.0):.4f}" if key in split else "–"


def compact(r: dict) -> dict:
    """The handful of numbers per head that fit one terminal line of `dvc exp show`."""
    out = {}
    for split in ("dev", "test"):
        for key in ("wf1", "mean_r"):
            if key in r.get(split, {}):
                out[f"{split}_{key}"] = round(r[split][key], 4)
                out[f"{split}_{key}_std"] = round(r.get(f"{split}_std", {}).get(key, 0.0), 4)
    out["seeds"] = len(r.get("seeds", [0]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default="results")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    rows, missing = [], []
    for dataset in params.datasets:   # what params trains now: results of heads since removed are not current
        for head in params.train:
            path = Path(args.results) / dataset / head / "metrics.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
            else:
                missing.append(f"{dataset}/{head}")
    if missing:
        log.warning("no results yet for %s", ", ".join(missing))
    lines = ["| dataset | head | modalities | seeds | dev WF1 | test WF1 | test acc | test mean r | best epoch | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dev, test, dev_sd, test_sd = (r.get(k, {}) for k in ("dev", "test", "dev_std", "test_std"))
        lines.append(f"| {r['dataset']} | {r['head']} | {'+'.join(r['modalities'])} | {len(r.get('seeds', [0]))} | "
                     f"{pm(dev, dev_sd, 'wf1')} | {pm(test, test_sd, 'wf1')} | {pm(test, test_sd, 'accuracy')} | "
                     f"{pm(test, test_sd, 'mean_r')} | {r['best_epoch']} | {r['seconds_per_epoch']} |")
    for dataset in params.datasets:
        per_class = [r for r in rows if r["dataset"] == dataset and "f1_per_class" in r.get("test", {})]
        if not per_class:
            continue
        labels = list(per_class[0]["test"]["f1_per_class"])
        lines += ["", f"Test F1 per class on {dataset} (mean over seeds):", "",
                  "| head | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for r in per_class:
            f1 = r["test"]["f1_per_class"]
            lines.append(f"| {r['head']} | " + " | ".join(f"{f1.get(c, 0.0):.3f}" for c in labels) + " |")
    layered = [r for r in rows if r.get("layer_weights")]
    if layered:   # heads on stores of several encoder layers: which layers they weigh (heads/layers.py)
        lines += ["", "Learned layer weights (kept seed; hidden state 0 = embeddings):", "",
                  "| dataset | head | modality | weight by layer |", "|---|---|---|---|"]
        for r in layered:
            for m, w in r["layer_weights"].items():
                lines.append(f"| {r['dataset']} | {r['head']} | {m} | "
                             + " ".join(f"{i}: {v:.3f}" for i, v in w.items()) + " |")
    lines += ["", "Means ± std over each head's seeds (`trainer.seeds`); every checkpoint and the kept seed are "
              "selected on dev, never on test."]
    out = Path(args.out)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "report.json", json.dumps(rows, indent=1))
    metrics: dict = {}
    for r in rows:
        metrics.setdefault(r["dataset"], {})[r["head"]] = compact(r)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    log.info("\n".join(lines))


if __name__ == "__main__":
    run_stage(main)
