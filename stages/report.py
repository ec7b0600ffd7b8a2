"""Stage report: one comparison of the heads params.yaml trains now, on each dataset -> reports/report.md,
reports/report.json (every head's metrics, and the intervals and tests below) and reports/metrics.json (the
compact file DVC shows as the pipeline's metrics: `dvc metrics show`, `dvc exp show`).

Per dataset: a table of mean ± std over folds × seeds; per headline metric (params `headline`, default the
field's: pipeline/metrics.py) each head's 95% confidence interval by bootstrap over dialogues and a paired test
against the best head on dev (pipeline/report_tables.py, params `significance`); with cross-validation, the
spread between folds and over seeds; F1 per class; learned layer weights. Then the cross-corpus runs (stage
cross) and the papers' claims (params `claims`, from the recipes) beside ours."""
import argparse
import json
import logging
from pathlib import Path

import pandas as pd

from pipeline import UserError, paths
from pipeline.logs import run_stage
from pipeline.metrics import CATEGORICAL, DISPLAY, HEADLINES, MetricError, headline_metric
from pipeline.params import load_params
from pipeline.report_tables import (claims_markdown, compact_columns, folds_markdown, reference_head, significance,
                                    significance_markdown)
from pipeline.significance import SignificanceError, bootstrap_ci, table_stats
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)
TEXT_COLUMNS = ("utt_id", "dialogue_id", "label", "prediction", "fold")


def pm(split: dict, std: dict, key: str) -> str:
    return f"{split[key]:.4f} ± {std.get(key, 0.0):.4f}" if key in split else "–"


def compact(r: dict, headline: tuple[str, ...] = ()) -> dict:
    """The handful of numbers per head that fit one terminal line of `dvc exp show`: dev and test WF1 (or mean
    r), the dataset's headline metrics, their mean ± std over runs; `seeds` and `folds` counted."""
    out = {}
    for split in ("dev", "test"):
        for key in dict.fromkeys(("wf1", "mean_r") + tuple(headline)):
            if key in r.get(split, {}):
                out[f"{split}_{key}"] = round(r[split][key], 4)
                out[f"{split}_{key}_std"] = round(r.get(f"{split}_std", {}).get(key, 0.0), 4)
    out["seeds"] = len(r.get("seeds", [0]))
    out["folds"] = len(r.get("folds", [0]))
    return out


def read_metrics(path: Path) -> dict:
    """A train stage's metrics.json (UTF-8 JSON object), or a `UserError` naming it and what to do."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (UnicodeDecodeError, ValueError) as e:
        reason = f"not UTF-8 text ({e.reason} at byte {e.start})" if isinstance(e, UnicodeDecodeError) else \
            f"not a JSON object ({str(e).splitlines()[0][:120]})"
        raise UserError(f"{path}: {reason}; delete it and re-run its train stage "
                        f"(`dvc repro train@{path.parent.parent.name}-{path.parent.name}`)") from None


def read_predictions(path: Path) -> pd.DataFrame:
    """A predictions CSV: labels as text ('' stays ''), numbers as numbers (an empty one is NaN)."""
    columns = pd.read_csv(path, nrows=0).columns
    return pd.read_csv(path, keep_default_na=False, na_values={c: [""] for c in columns if c not in TEXT_COLUMNS},
                       dtype={c: str for c in columns if c in TEXT_COLUMNS})


def classes_of(table: pd.DataFrame) -> tuple[list[str] | None, list[str] | None]:
    """(labels, dims) of a prediction table: its `p_<label>` columns in order, or its `<dim>_true` columns."""
    labels = [c[2:] for c in table.columns if c.startswith("p_")]
    dims = [c[:-5] for c in table.columns if c.endswith("_true")]
    return (labels or None, None) if "prediction" in table.columns else (None, dims)


def headline_of(params, dataset: str, task: str, n_classes: int | None) -> tuple[str, ...]:
    """The dataset's headline metric keys: params `headline.<dataset>`, else the field's for its name or
    adapter (pipeline/metrics.py `HEADLINES`)."""
    kind = dataset if dataset.lower().replace("-", "").replace("_", "") in HEADLINES else \
        params.dataset(dataset).adapter
    try:
        return headline_metric(kind, task, n_classes, params.headline.get(dataset))
    except MetricError as e:
        raise UserError(f"headline.{dataset}: {e}") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default=paths.RESULTS)
    ap.add_argument("--out", default=paths.REPORTS)
    ap.add_argument("--params", default=paths.PARAMS)
    args = ap.parse_args(argv)
    params = load_params(args.params)
    sig = params.significance
    pct = int(round(sig.confidence * 100))
    rows, missing = [], []
    for dataset in params.datasets:   # what params trains now: results of heads since removed are not current
        for head in params.train:
            path = Path(paths.result(dataset, head, paths.METRICS, args.results))
            if path.exists():
                rows.append(read_metrics(path))
            else:
                missing.append(f"{dataset}/{head}")
    if missing:
        log.warning("no results yet for %s", ", ".join(missing))
    lines = ["| dataset | head | modalities | protocol | runs | dev WF1 | test WF1 | test UA | test acc (WA) | "
             "test mean CCC | test mean r | best epoch | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dev, test, dev_sd, test_sd = (r.get(k, {}) for k in ("dev", "test", "dev_std", "test_std"))
        protocol = r.get("protocol", "official")
        protocol = protocol if isinstance(protocol, str) else protocol.get("kind", "custom")
        runs = f"{len(r.get('folds', [0]))}×{len(r.get('seeds', [0]))}"
        lines.append(f"| {r['dataset']} | {r['head']} | {'+'.join(r['modalities'])} | {protocol} | {runs} | "
                     f"{pm(dev, dev_sd, 'wf1')} | {pm(test, test_sd, 'wf1')} | {pm(test, test_sd, 'ua')} | "
                     f"{pm(test, test_sd, 'accuracy')} | {pm(test, test_sd, 'mean_ccc')} | "
                     f"{pm(test, test_sd, 'mean_r')} | {r['best_epoch']} | {r['seconds_per_epoch']} |")
    lines += ["", "Means ± std over each head's runs (folds × seeds: `data.<dataset>.protocol`, `trainer.seeds`); "
              "every checkpoint, the kept seed and the kept run are selected on dev, never on test."]

    metrics: dict = {}
    ours: dict[tuple[str, str], dict] = {}     # (dataset, head) -> metric -> mean, std, low, high
    for dataset in params.datasets:
        summaries = {r["head"]: r for r in rows if r["dataset"] == dataset}
        if not summaries:
            continue
        tables = {}
        for h in summaries:
            path = Path(paths.result(dataset, h, paths.predictions("test"), args.results))
            if path.exists():
                tables[h] = read_predictions(path)
        labels, dims = classes_of(next(iter(tables.values()))) if tables else (None, None)
        task = "categorical" if any("wf1" in s.get("test", s.get("dev", {})) for s in summaries.values()) \
            else "dimensional"
        headline = headline_of(params, dataset, task, len(labels) if labels else None)
        claimed = [c.metric for c in params.claims if c.dataset == dataset
                   and (c.metric in CATEGORICAL) == (task == "categorical")]
        for h, r in summaries.items():
            metrics.setdefault(dataset, {})[h] = compact(r, headline)
            for m in dict.fromkeys(headline + tuple(claimed)):
                if m in r.get("test", {}):
                    ours.setdefault((dataset, h), {})[m] = {"mean": r["test"][m],
                                                            "std": r.get("test_std", {}).get(m, 0.0)}
        for i, m in enumerate(dict.fromkeys(headline + tuple(claimed))):
            ref = reference_head(summaries, m)
            try:
                result = significance(tables, m, ref, labels=labels, dims=dims, n_resamples=sig.n_resamples,
                                      confidence=sig.confidence, seed=sig.seed, method=sig.method)
            except SignificanceError as e:   # predictions from an older train stage (no dialogue_id column)
                lines += ["", f"No {pct}% CI of {DISPLAY.get(m, m)} on {dataset}: {e} (re-run its train stages)"]
                continue
            for h, row in result.items():
                ours.setdefault((dataset, h), {}).setdefault(m, {}).update(low=row["low"], high=row["high"])
                if m in headline:
                    metrics[dataset][h].update(compact_columns(row, m))
                summaries[h].setdefault("significance", {})[m] = row
            if m in headline:
                lines += [""] + significance_markdown(dataset, m, result, ref, summaries, sig.confidence)
        folds = {h: r["folds_summary"] for h, r in summaries.items()
                 if len(r.get("folds", [])) > 1 and r.get("folds_summary")}
        if folds:
            lines += [""] + folds_markdown(dataset, folds, list(dict.fromkeys(headline + (("wf1",) if task ==
                                                                                      "categorical" else ()))))
            lines += ["", "Cross-validated: the interval and the test above use each fold's best seed's test "
                      "predictions, pooled (every utterance once, out of fold); the per-run table is in "
                      "each head's metrics.json (`per_run`)."]
        per_class = [r for r in summaries.values() if "f1_per_class" in r.get("test", {})]
        if per_class:
            classes = list(per_class[0]["test"]["f1_per_class"])
            lines += ["", f"Test F1 per class on {dataset} (mean over runs):", "",
                      "| head | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
            for r in per_class:
                f1 = r["test"]["f1_per_class"]
                lines.append(f"| {r['head']} | " + " | ".join(f"{f1.get(c, 0.0):.3f}" for c in classes) + " |")
    layered = [r for r in rows if r.get("layer_weights")]
    if layered:   # heads on stores of several encoder layers: which layers they weigh (heads/layers.py)
        lines += ["", "Learned layer weights (kept run; hidden state 0 = embeddings):", "",
                  "| dataset | head | modality | weight by layer |", "|---|---|---|---|"]
        for r in layered:
            for m, w in r["layer_weights"].items():
                lines.append(f"| {r['dataset']} | {r['head']} | {m} | "
                             + " ".join(f"{i}: {v:.3f}" for i, v in w.items()) + " |")
    cross = cross_corpus(params, args.results, pct)
    if cross["lines"]:
        lines += [""] + cross["lines"]
        metrics["cross_corpus"] = cross["compact"]
    if params.claims:
        lines += ["", "The papers' claims beside ours (ours: mean ± std over runs, and the "
                  f"{pct}% CI of the kept model's test predictions; `–`: not run here, or under another protocol):",
                  ""]
        protocols = {d: (p if isinstance(p, str) else "custom") for d, p in
                     ((d, params.data[d].protocol) for d in params.data)}
        claims = [{"head": c.head, "dataset": c.dataset, "protocol": c.protocol, "metric": c.metric,
                   "value": c.value, "source": c.source} for c in params.claims]
        lines += claims_markdown(claims, ours, protocols)
    atomic_write_text(paths.report(paths.REPORT_MD, args.out), "\n".join(lines) + "\n")
    atomic_write_text(paths.report(paths.REPORT_JSON, args.out), json.dumps(rows + cross["rows"], indent=1))
    atomic_write_text(paths.report(paths.METRICS, args.out), json.dumps(metrics, indent=1))
    log.info("\n".join(lines))


def cross_corpus(params, results: str, pct: int) -> dict:
    """The cross-corpus table (stage cross's results/cross/<name>/), with each run's headline CI."""
    sig = params.significance
    out = {"lines": [], "rows": [], "compact": {}}
    done = [n for n in params.cross_corpus if (Path(results) / paths.CROSS / n / paths.METRICS).exists()]
    if not done:
        return out
    out["lines"] = ["Cross-corpus: a bundle scored on another dataset (stage cross, through `ercflow predict`'s "
                    f"code path), classes mapped to shared ones; {pct}% CI by bootstrap over dialogues:", "",
                    "| name | model | scored on | shared classes | metric | value [CI] | utterances |",
                    "|---|---|---|---|---|---|---|"]
    for n in done:
        c = params.cross_corpus[n]
        folder = Path(results) / paths.CROSS / n
        r = read_metrics(folder / paths.METRICS)
        table = read_predictions(folder / paths.CROSS_PREDICTIONS)
        labels = r.get("labels")
        headline = headline_of(params, c.test, "categorical", len(labels) if labels else None) \
            if labels else headline_of(params, c.test, "dimensional", None)
        for m in headline:
            try:
                ci = bootstrap_ci(table_stats(table[table["label"] != ""] if labels else table, labels,
                                              r.get("dimensions")), m, sig.n_resamples, sig.confidence, sig.seed,
                                  sig.method)
                cell = f"{ci['value']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]"
                out["compact"].setdefault(n, {}).update({f"test_{m}": round(ci["value"], 4),
                                                         f"test_{m}_ci_low": round(ci["low"], 4),
                                                         f"test_{m}_ci_high": round(ci["high"], 4)})
                r.setdefault("ci", {})[m] = ci
            except SignificanceError as e:
                cell = f"{r['metrics'].get(m, float('nan')):.4f} (no CI: {e})"
            out["lines"].append(f"| {n} | {c.train}/{c.head} | {c.test} ({c.split}) | "
                                f"{', '.join(labels or r.get('dimensions') or [])} | {DISPLAY.get(m, m)} | {cell} | "
                                f"{r['metrics'].get('support', len(table))} |")
        out["rows"].append(r)
    return out


if __name__ == "__main__":
    run_stage(main)
