"""The report's numbers a reviewer asks for, as data and as markdown: per dataset, each head's headline metric
on its test predictions with a 95% confidence interval (bootstrap over dialogues) and a paired test against the
reference head (the best on dev: the reference is chosen without looking at test); mean ± std over folds ×
seeds with the spread split into folds and seeds; the papers' claims beside ours. Pure functions of the train
stage's outputs (results/<dataset>/<head>/metrics.json and predictions_test.csv) and the manifest's
utt_id -> dialogue_id map, so stages/report.py stays a thin caller (pipeline/significance.py does the maths).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from pipeline.metrics import DISPLAY
from pipeline.significance import SignificanceError, bootstrap_ci, paired_test, table_stats


def reference_head(summaries: Mapping[str, dict], metric: str) -> str | None:
    """The head with the best mean dev `metric` (metrics.json's `dev`), or the best test one where no head has
    dev scores; ties go to the first head listed. MSE is the one metric where lower is better."""
    sign = -1.0 if metric == "mean_mse" else 1.0
    for split in ("dev", "test"):
        scored = {h: s[split][metric] for h, s in summaries.items() if metric in s.get(split, {})}
        if scored:
            return max(scored, key=lambda h: sign * scored[h])
    return None


def significance(tables: Mapping[str, pd.DataFrame], metric: str, reference: str | None,
                 labels: list[str] | None = None, dims: list[str] | None = None,
                 dialogues: pd.Series | None = None, n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0, method: str = "percentile") -> dict[str, dict]:
    """Per head: `value`, `low`, `high` (its metric on its test predictions and the bootstrap interval), and
    against `reference`: `diff` (head - reference), `diff_low`, `diff_high`, `p_value` (None for the reference
    itself, or when the two were not scored on the same dialogues and classes: `note` says why). Every head's
    bootstrap and every pair's test draws from `seed`: the report is reproducible."""
    stats = {h: table_stats(t, labels, dims, dialogues) for h, t in tables.items() if len(t)}
    out: dict[str, dict] = {}
    for head, s in stats.items():
        ci = bootstrap_ci(s, metric, n_resamples=n_resamples, confidence=confidence, seed=seed, method=method)
        row = {"value": ci["value"], "low": ci["low"], "high": ci["high"], "dialogues": ci["dialogues"],
               "diff": None, "diff_low": None, "diff_high": None, "p_value": None, "note": ""}
        if reference in stats and head != reference:
            try:
                test = paired_test(s, stats[reference], metric, n_resamples=n_resamples, confidence=confidence,
                                   seed=seed)
                row.update(diff=test["diff"], diff_low=test["low"], diff_high=test["high"], p_value=test["p_value"])
            except SignificanceError as e:
                row["note"] = str(e)
        out[head] = row
    return out


def compact_columns(row: dict, metric: str) -> dict[str, float]:
    """The columns reports/metrics.json gains per head (beside `test_<metric>` and its `_std`)."""
    out = {f"test_{metric}_ci_low": round(row["low"], 4), f"test_{metric}_ci_high": round(row["high"], 4)}
    if row.get("p_value") is not None:
        out[f"test_{metric}_diff_vs_ref"] = round(row["diff"], 4)
        out[f"test_{metric}_p_vs_ref"] = round(row["p_value"], 4)
    return out


def _num(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def significance_markdown(dataset: str, metric: str, rows: Mapping[str, dict], reference: str | None,
                          summaries: Mapping[str, dict] | None = None, confidence: float = 0.95) -> list[str]:
    """A markdown table: head | mean ± std over runs | value [CI] of the kept model | Δ vs reference [CI] | p."""
    name, pct = DISPLAY.get(metric, metric), int(round(confidence * 100))
    lines = [f"Test {name} on {dataset}: {pct}% CI by bootstrap over dialogues; paired test against {reference} "
             "(best on dev) by approximate randomisation over dialogues:", "",
             f"| head | {name} mean ± std | {name} [{pct}% CI] | Δ vs {reference} [{pct}% CI] | p |",
             "|---|---|---|---|---|"]
    for head, r in rows.items():
        s = (summaries or {}).get(head, {})
        mean, std = s.get("test", {}).get(metric), s.get("test_std", {}).get(metric)
        spread = f"{_num(mean)} ± {_num(std)}" if mean is not None else "–"
        if head == reference:
            delta, p = "(reference)", "–"
        elif r["p_value"] is None:
            delta, p = "–", "–"
        else:
            delta = f"{r['diff']:+.4f} [{r['diff_low']:+.4f}, {r['diff_high']:+.4f}]"
            p = f"{r['p_value']:.3g}"
        ci = f"{_num(r['value'])} [{_num(r['low'])}, {_num(r['high'])}]"
        lines.append(f"| {head} | {spread} | {ci} | {delta} | {p} |")
    lines += ["", "The interval and the test use the kept seed's test predictions (the best seed on dev); "
              "mean ± std is over every seed (and fold)."]
    return lines


def folds_markdown(dataset: str, summaries: Mapping[str, Mapping[str, dict]], metrics: list[str]) -> list[str]:
    """Mean ± std over folds × seeds per head (`fold_seed_summary` of each head's runs), with the spread
    between folds and within folds over seeds beside it."""
    cols = [DISPLAY.get(m, m) for m in metrics]
    lines = [f"Test scores on {dataset}, mean ± std over folds × seeds (std between folds / over seeds):", "",
             "| head | runs | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for head, summary in summaries.items():
        runs = max((summary[m]["runs"] for m in metrics if m in summary), default=0)
        cells = [f"{summary[m]['mean']:.4f} ± {summary[m]['std']:.4f} ({summary[m]['std_folds']:.4f} / "
                 f"{summary[m]['std_seeds']:.4f})" if m in summary else "–" for m in metrics]
        lines.append(f"| {head} | {runs} | " + " | ".join(cells) + " |")
    return lines


def claims_markdown(claims: list[dict], ours: Mapping[tuple[str, str], dict],
                    protocols: Mapping[str, str] | None = None) -> list[str]:
    """The papers' claims (each `{head, dataset, protocol, metric, value, source}`, from a recipe) beside ours:
    `ours[(dataset, head)][metric]` = {mean, std, low, high} (low/high may be absent). Values in [0, 1] as ours;
    a claim given in percent (> 1) is scaled. With `protocols` (dataset -> the protocol ours ran under), ours
    is shown only beside a claim of the same protocol (`–` otherwise: the numbers do not compare)."""
    lines = ["| head | dataset | protocol | metric | paper | ours (mean ± std) | ours [95% CI] | source |",
             "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        claimed = c["value"] / 100 if c["value"] > 1 else c["value"]
        same = protocols is None or protocols.get(c["dataset"]) == c.get("protocol", "official")
        o = ours.get((c["dataset"], c["head"]), {}).get(c["metric"], {}) if same else {}
        mean = f"{o['mean']:.4f} ± {o.get('std', 0.0):.4f}" if "mean" in o else "–"
        ci = f"[{o['low']:.4f}, {o['high']:.4f}]" if "low" in o else "–"
        metric = DISPLAY.get(c["metric"], c["metric"])
        lines.append(f"| {c['head']} | {c['dataset']} | {c.get('protocol', 'official')} | {metric} | {claimed:.4f} | "
                     f"{mean} | {ci} | {c.get('source', '')} |")
    return lines
