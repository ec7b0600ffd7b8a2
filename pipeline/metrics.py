"""Evaluation: the field's metrics of a categorical head (weighted F1, macro F1, accuracy = WA, unweighted
accuracy UA = mean per-class recall, per-class F1 and recall, confusion; checked against scikit-learn) and of a dimensional one
(Pearson r, MSE, MAE and Lin's concordance correlation coefficient CCC per dimension); the same metrics as
vectorised functions of sufficient statistics (a confusion matrix, the moments of true and predicted values),
which the dialogue bootstrap of pipeline/significance.py sums per resample; the headline metric per dataset;
the prediction table (labels and class probabilities) that the train stage and `ercflow predict` write."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import UserError


class MetricError(UserError, ValueError):
    pass


# what each metric key is called in a report
DISPLAY = {"wf1": "WF1", "macro_f1": "macro F1", "accuracy": "WA", "ua": "UA",
           "mean_ccc": "CCC", "mean_r": "r", "mean_mse": "MSE"}
CATEGORICAL = ("wf1", "macro_f1", "accuracy", "ua")
DIMENSIONAL = ("mean_ccc", "mean_r", "mean_mse")

# The number each community compares on a dataset (its first metric is the headline; the others sit beside it).
# MELD / EmoryNLP: weighted F1 (the ERC papers: DialogueTRM arXiv:2010.07637, TelME arXiv:2401.12987, MaTAV);
# IEMOCAP six classes, sessions 1-4 / 5: weighted F1 (the same papers); IEMOCAP four classes (happy + excited,
# leave-one-session-out): UA and WA (SUPERB arXiv:2105.01051, EmoBox arXiv:2406.07162); AVEC's dimensions: CCC.
HEADLINES: dict[str, tuple[str, ...]] = {
    "meld": ("wf1",), "emorynlp": ("wf1",), "iemocap": ("wf1",), "iemocap6": ("wf1",),
    "iemocap4": ("ua", "accuracy"), "avec": ("mean_ccc",),
    "categorical": ("wf1",), "dimensional": ("mean_ccc",),
}


def headline_metric(kind: str, task: str = "categorical", n_classes: int | None = None,
                    override: list[str] | tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The metric keys a report leads with for a dataset of `kind` (its adapter or name: meld, emorynlp,
    iemocap, iemocap4, avec, ...; unknown kinds fall back to the task's default). IEMOCAP with 4 classes is
    scored as the speech community does (UA, WA). `override` (params) wins, checked against the task's keys."""
    known = CATEGORICAL if task == "categorical" else DIMENSIONAL
    if override:
        bad = [k for k in override if k not in known]
        if bad:
            raise MetricError(f"headline metric(s) {bad} unknown for a {task} task; known: {list(known)}")
        return tuple(override)
    key = kind.lower().replace("-", "").replace("_", "")
    if key == "iemocap" and n_classes == 4:
        key = "iemocap4"
    chosen = HEADLINES.get(key)
    if chosen is None or any(k not in known for k in chosen):
        chosen = HEADLINES[task]
    return chosen


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """WF1 (`wf1`), macro F1, accuracy (WA), UA (mean recall over the classes that occur in `y_true`, as
    sklearn's balanced accuracy), F1 and recall per class, confusion (rows: true, columns: predicted).
    Macro F1 averages over the classes that occur in `y_true` or `y_pred` (sklearn's default label set): a
    class absent from a fold neither helps nor hurts. Computed from the confusion matrix by `confusion_scores`
    (one implementation for a run and the bootstrap; tests/test_metrics.py checks both against scikit-learn,
    which every stage would otherwise spend ~1.5 s importing)."""
    y_true, y_pred = np.asarray(y_true, np.int64).reshape(-1), np.asarray(y_pred, np.int64).reshape(-1)
    if not len(y_true) or len(y_true) != len(y_pred):
        raise MetricError(f"{len(y_true)} true and {len(y_pred)} predicted labels: nothing to score")
    c = len(labels)
    cm = np.zeros((c, c + 1), np.int64)   # the last column: predictions outside the classes (always wrong)
    known = (y_true >= 0) & (y_true < c)
    np.add.at(cm, (y_true[known], np.where((y_pred >= 0) & (y_pred < c), y_pred, c)[known]), 1)
    scores = confusion_scores(cm)
    return {
        "wf1": float(scores["wf1"]),
        "accuracy": float(np.mean(y_true == y_pred)),
        "f1_per_class": {name: float(f) for name, f in zip(labels, scores["f1"])},
        "confusion": cm[:, :c].tolist(),
        "support": int(len(y_true)),
        "macro_f1": float(scores["macro_f1"]),
        "ua": float(scores["ua"]),
        "recall_per_class": {name: float(r) for name, r in zip(labels, scores["recall"])},
    }


def ccc(t: np.ndarray, p: np.ndarray) -> float:
    """Lin's concordance correlation coefficient 2 cov(t, p) / (var t + var p + (mean t - mean p)^2), with
    population (1/n) moments as AVEC scores it; 0 where it is undefined (fewer than 2 values, both constant)."""
    t, p = np.asarray(t, np.float64), np.asarray(p, np.float64)
    if len(t) < 2:
        return 0.0
    den = t.var() + p.var() + (t.mean() - p.mean()) ** 2
    return float(2 * np.mean((t - t.mean()) * (p - p.mean())) / den) if den > 0 else 0.0


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, dims: list[str]) -> dict:
    """Pearson r, CCC, MSE and MAE per dimension (rows with a NaN target are left out of that dimension);
    `mean_r`, `mean_ccc` and `mean_mse` over the dimensions."""
    out = {}
    for k, name in enumerate(dims):
        ok = np.isfinite(y_true[:, k])
        t, p = y_true[ok, k], y_pred[ok, k]
        r = float(np.corrcoef(t, p)[0, 1]) if ok.sum() > 1 and t.std() > 0 and p.std() > 0 else 0.0
        out[name] = {"pearson_r": r, "mse": float(np.mean((t - p) ** 2)) if ok.any() else float("nan"),
                     "mae": float(np.mean(np.abs(t - p))) if ok.any() else float("nan"),
                     "ccc": ccc(t, p)}
    out["mean_r"] = float(np.mean([out[d]["pearson_r"] for d in dims])) if dims else 0.0
    out["mean_ccc"] = float(np.mean([out[d]["ccc"] for d in dims])) if dims else 0.0
    out["mean_mse"] = float(np.mean([out[d]["mse"] for d in dims])) if dims else float("nan")
    return out


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0 (sklearn's zero_division=0)."""
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


def confusion_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """The categorical headline metrics, and `f1` and `recall` per class [..., C], of confusion matrices `cm`
    [..., C, C + k] (rows true, columns predicted; k extra columns count predictions outside the C classes, wrong
    for every row), vectorised over the leading axes: the same numbers as `classification_metrics` on the labels that made `cm`
    (tests/test_metrics.py checks it), at the cost of a few sums, so a bootstrap can score thousands of
    resampled confusion matrices at once."""
    cm = np.asarray(cm, np.float64)
    c = cm.shape[-2]
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(-1), cm.sum(-2)[..., :c]
    total = support.sum(-1)
    f1 = _div(2 * tp, support + predicted)
    recall = _div(tp, support)
    present, seen = support > 0, (support + predicted) > 0
    return {"wf1": _div((f1 * support).sum(-1), total),
            "macro_f1": _div((f1 * seen).sum(-1), seen.sum(-1).astype(np.float64)),
            "accuracy": _div(tp.sum(-1), total),
            "ua": _div((recall * present).sum(-1), present.sum(-1).astype(np.float64)),
            "f1": f1, "recall": recall}


MOMENTS = ("n", "t", "p", "tt", "pp", "tp")   # the sums `moment_scores` reads, in this order


def moment_scores(m: np.ndarray) -> dict[str, np.ndarray]:
    """CCC, Pearson r and MSE of dimensions from their sums `m` [..., D, 6] (`MOMENTS`: count, sum of true,
    of predicted, of squares, of products), vectorised over the leading axes; `mean_*` average over D."""
    m = np.asarray(m, np.float64)
    n, st, sp, stt, spp, stp = (m[..., i] for i in range(6))
    mt, mp = _div(st, n), _div(sp, n)
    vt, vp = _div(stt, n) - mt ** 2, _div(spp, n) - mp ** 2
    cov = _div(stp, n) - mt * mp
    ccc_ = _div(2 * cov, vt + vp + (mt - mp) ** 2)
    r = _div(cov, np.sqrt(np.clip(vt * vp, 0, None)))
    mse = _div(stt - 2 * stp + spp, n)
    return {"ccc": ccc_, "pearson_r": r, "mse": mse,
            "mean_ccc": ccc_.mean(-1), "mean_r": r.mean(-1), "mean_mse": mse.mean(-1)}


def moments(t: np.ndarray, p: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
    """The sums [D, 6] of `moment_scores` for true and predicted values [n, D] (NaN targets left out of their
    dimension). `shift` is subtracted from both first: a common shift leaves CCC, r and MSE unchanged and keeps
    the sums of squares from cancelling."""
    t, p = np.asarray(t, np.float64), np.asarray(p, np.float64)
    if shift is not None:
        t, p = t - shift, p - shift
    ok = np.isfinite(t)
    t, p = np.where(ok, t, 0.0), np.where(ok, p, 0.0)
    return np.stack([ok.sum(0), t.sum(0), p.sum(0), (t * t).sum(0), (p * p).sum(0), (t * p).sum(0)], -1)


def score_table(table: pd.DataFrame, labels: list[str] | None = None, dims: list[str] | None = None) -> dict:
    """The metrics of a prediction table (`prediction_table`'s columns: `label` and `prediction`, or
    `<dim>_true` and `<dim>`), as the trainer scores its outputs; rows whose true label is empty or not in
    `labels` are not scored (a label map's dropped classes). A prediction outside `labels` counts as wrong."""
    if dims:
        missing = [c for d in dims for c in (d, f"{d}_true") if c not in table.columns]
        if missing:
            raise MetricError(f"prediction table lacks column(s) {missing}")
        return regression_metrics(table[[f"{d}_true" for d in dims]].to_numpy(np.float64),
                                  table[dims].to_numpy(np.float64), list(dims))
    if not {"label", "prediction"} <= set(table.columns):
        raise MetricError("prediction table lacks a 'label' or 'prediction' column: it is not scored")
    labels = list(labels) if labels else sorted(set(table["label"]) - {""})
    index = {name: i for i, name in enumerate(labels)}
    y = table["label"].map(index)
    keep = y.notna().to_numpy()
    pred = table["prediction"].map(index).fillna(len(labels)).to_numpy(np.int64)   # unknown: a class of its own
    return classification_metrics(y[keep].to_numpy(np.int64), pred[keep], labels)


def prediction_table(rows: pd.DataFrame, out: np.ndarray, task: str, labels: list[str],
                     dimensions: list[str]) -> pd.DataFrame:
    """Head outputs [n, C] of manifest `rows` as a table: `utt_id`, the true `label` (where the rows have one),
    `prediction` and one probability column `p_<label>` per class (softmax, float64), or one column per
    dimension. The train stage writes it per split; `ercflow predict` returns it for new conversations."""
    table = rows[["utt_id"]].reset_index(drop=True)
    if task == "categorical":
        z = out.astype(np.float64)
        probs = np.exp(z - z.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        if "label" in rows.columns:
            table["label"] = rows["label"].to_numpy()
        table["prediction"] = [labels[i] for i in probs.argmax(1)]
        for j, label in enumerate(labels):
            table[f"p_{label}"] = probs[:, j]
    else:
        for j, dim in enumerate(dimensions):
            if dim in rows.columns:
                table[f"{dim}_true"] = rows[dim].to_numpy()
            table[dim] = out[:, j]
    return table


def mean_and_std(runs: list[dict]) -> tuple[dict, dict]:
    """Mean and (population) std over runs of every numeric entry of their metrics dicts, nested dicts (e.g.
    `f1_per_class`) included; non-numeric entries (confusion matrices, counts as lists) are left out."""
    mean, std = {}, {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(first, dict):
            mean[key], std[key] = mean_and_std(values)
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            a = np.asarray(values, np.float64)
            mean[key], std[key] = float(a.mean()), float(a.std())
    return mean, std
