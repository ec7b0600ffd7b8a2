"""Evaluation: weighted F1, accuracy, per-class F1, confusion matrix (scikit-learn); Pearson r per dimension;
the prediction table (labels and class probabilities) that the train stage and `ercflow predict` write."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    classes = list(range(len(labels)))
    per_class = f1_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    return {
        "wf1": float(f1_score(y_true, y_pred, labels=classes, average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_per_class": {name: float(f) for name, f in zip(labels, per_class)},
        "confusion": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        "support": int(len(y_true)),
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, dims: list[str]) -> dict:
    """Pearson r, MSE and MAE per dimension (rows with a NaN target are left out of that dimension)."""
    out = {}
    for k, name in enumerate(dims):
        ok = np.isfinite(y_true[:, k])
        t, p = y_true[ok, k], y_pred[ok, k]
        r = float(np.corrcoef(t, p)[0, 1]) if ok.sum() > 1 and t.std() > 0 and p.std() > 0 else 0.0
        out[name] = {"pearson_r": r, "mse": float(np.mean((t - p) ** 2)) if ok.any() else float("nan"),
                     "mae": float(np.mean(np.abs(t - p))) if ok.any() else float("nan")}
    out["mean_r"] = float(np.mean([out[d]["pearson_r"] for d in dims])) if dims else 0.0
    return out


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
