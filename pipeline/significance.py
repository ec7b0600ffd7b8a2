"""How sure a score is: a 95% confidence interval of a head's metric by bootstrap over dialogues, a paired test
of two heads over the same dialogues, and mean ± std over folds × seeds with the per-run table kept.

The dialogue is the unit resampled. Utterances of one conversation share speakers, topic and the head's own
context (every head here reads the dialogue), so they are not independent draws; resampling utterances would
make the interval too narrow (the cluster bootstrap: Field & Welsh, JRSS-B 2007). Each dialogue is reduced to
sufficient statistics — its confusion matrix, or the sums of true and predicted values, their squares and
products — and a resample's metric is the metric of the summed statistics (pipeline/metrics.py:
`confusion_scores`, `moment_scores`), exactly the metric of its pooled utterances.

scipy.stats.bootstrap and scipy.stats.permutation_test resample *observations* along an axis. Handed the
utterances they would resample utterances; handed the [n_dialogues, S] statistics they resample dialogues,
which is what is wanted, and keep their CI methods (percentile, BCa) and their p-value conventions. The paired
test is approximate randomisation (Noreen 1989; Riezler & Maxwell 2005) over dialogues: under the null, head
A's and head B's predictions of a dialogue are exchangeable, so each dialogue's two statistics are swapped at
random (`permutation_type="samples"`); the p-value is two-sided. The paired bootstrap (Koehn 2004) adds the
interval of the difference. Every draw comes from `numpy.random.default_rng(seed)`: the same inputs and seed
give the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline import UserError
from pipeline.metrics import CATEGORICAL, DIMENSIONAL, MOMENTS, confusion_scores, moment_scores, moments


class SignificanceError(UserError, ValueError):
    pass


_BATCH_ELEMENTS = 4_000_000   # resampled values held at once (scipy's `batch`): bounds memory, not results


@dataclass
class DialogueStats:
    """Per-dialogue sufficient statistics of one head's predictions: `stats` [n_dialogues, S] in the order of
    `dialogues`; `shape` unflattens S ([C, C + 1] confusion with an 'outside the classes' column, or [D, 6]
    moments); `task` says which scorer reads them."""
    dialogues: np.ndarray
    stats: np.ndarray
    shape: tuple[int, ...]
    task: str

    def score(self, sums: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics of summed statistics `sums` [..., S]."""
        sums = np.asarray(sums, np.float64)
        x = sums.reshape(*sums.shape[:-1], *self.shape)
        return confusion_scores(x) if self.task == "categorical" else moment_scores(x)

    def metric(self, name: str) -> float:
        """`name` on all the dialogues (the point estimate)."""
        self._check(name)
        return float(self.score(self.stats.sum(0))[name])

    def _check(self, name: str) -> None:
        known = CATEGORICAL if self.task == "categorical" else DIMENSIONAL
        if name not in known:
            raise SignificanceError(f"metric {name!r} is not one of a {self.task} task's {list(known)}")

    def aligned(self, other: "DialogueStats") -> tuple[np.ndarray, np.ndarray]:
        """Both heads' statistics over the same dialogues in the same order, or a `SignificanceError`."""
        if set(self.dialogues) != set(other.dialogues) or self.shape != other.shape:
            only = sorted(set(self.dialogues) ^ set(other.dialogues))[:5]
            why = f"dialogues in one only: {only}" if only else f"classes {self.shape} vs {other.shape}"
            raise SignificanceError(f"a paired test needs both heads' predictions of the same dialogues and "
                                    f"classes; {why}")
        order = pd.Index(other.dialogues).get_indexer(self.dialogues)
        return self.stats, other.stats[order]


def _statistic(stats: np.ndarray, score, name: str):
    """scipy's vectorised statistic: dialogue indices [..., n] (the resampled observations; scipy keeps the
    observation axis last) -> the metric of the summed statistics of those dialogues [...]. Resampling indices
    rather than the [n, S] statistics themselves keeps the layout of scipy's batches out of the way."""
    def statistic(idx, axis=-1):
        idx = np.moveaxis(np.asarray(idx), axis, -1).astype(np.int64)
        return score(stats[idx].sum(-2))[name]
    return statistic


def categorical_stats(y_true: np.ndarray, y_pred: np.ndarray, dialogues: np.ndarray, n_classes: int) -> DialogueStats:
    """Per-dialogue confusion matrices of class ids (`y_pred` outside 0..C-1: a prediction outside the scored
    classes, wrong; `y_true` outside: not scored)."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    keep = (y_true >= 0) & (y_true < n_classes)
    ids, inverse = np.unique(np.asarray(dialogues, dtype=str)[keep], return_inverse=True)
    pred = np.where((y_pred[keep] >= 0) & (y_pred[keep] < n_classes), y_pred[keep], n_classes)
    cm = np.zeros((len(ids), n_classes, n_classes + 1))
    np.add.at(cm, (inverse, y_true[keep], pred), 1)
    return DialogueStats(ids, cm.reshape(len(ids), -1), (n_classes, n_classes + 1), "categorical")


def dimensional_stats(y_true: np.ndarray, y_pred: np.ndarray, dialogues: np.ndarray) -> DialogueStats:
    """Per-dialogue moments [D, 6] of true and predicted values [n, D] (NaN targets left out)."""
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    shift = np.nanmean(y_true, 0)   # a common shift: the metrics do not change, the sums stay well conditioned
    ids, inverse = np.unique(np.asarray(dialogues, dtype=str), return_inverse=True)
    m = np.stack([moments(y_true[inverse == i], y_pred[inverse == i], shift) for i in range(len(ids))])
    return DialogueStats(ids, m.reshape(len(ids), -1), (y_true.shape[1], len(MOMENTS)), "dimensional")


def table_stats(table: pd.DataFrame, labels: list[str] | None = None, dims: list[str] | None = None,
                dialogues: pd.Series | None = None) -> DialogueStats:
    """`DialogueStats` of a prediction table (`label`/`prediction` or `<dim>_true`/`<dim>` columns, as
    pipeline/metrics.py's `score_table` reads it). The dialogue of each row comes from the table's
    `dialogue_id` column, or from `dialogues` (a Series utt_id -> dialogue_id, e.g. the manifest's)."""
    if "dialogue_id" in table.columns:
        dia = table["dialogue_id"].astype(str).to_numpy()
    elif dialogues is not None:
        dia = table["utt_id"].map(dialogues)
        if dia.isna().any():
            raise SignificanceError(f"utterance {table.loc[dia.isna(), 'utt_id'].iloc[0]!r} of the prediction table "
                                    "is not in the manifest it is scored against")
        dia = dia.astype(str).to_numpy()
    else:
        raise SignificanceError("prediction table has no dialogue_id column and no utt_id -> dialogue map was given")
    if dims:
        return dimensional_stats(table[[f"{d}_true" for d in dims]].to_numpy(np.float64),
                                 table[list(dims)].to_numpy(np.float64), dia)
    labels = list(labels) if labels else sorted(set(table["label"]) - {""})
    index = {name: i for i, name in enumerate(labels)}
    y = table["label"].map(index).fillna(-1).to_numpy(np.int64)
    p = table["prediction"].map(index).fillna(len(labels)).to_numpy(np.int64)
    return categorical_stats(y, p, dia, len(labels))


def _batch(s: DialogueStats, samples: int = 1) -> int:
    return max(1, _BATCH_ELEMENTS // max(1, s.stats.size * samples))


def bootstrap_ci(s: DialogueStats, metric: str, n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0, method: str = "percentile") -> dict:
    """The metric on all dialogues (`value`) and its `confidence` interval (`low`, `high`) and standard error
    (`se`) from `n_resamples` bootstrap resamples of dialogues. `method`: percentile (default: never undefined,
    easy to explain) or BCa (scipy's default; NaN when the bootstrap distribution is degenerate)."""
    if len(s.dialogues) < 2:
        raise SignificanceError(f"a bootstrap over dialogues needs 2 or more dialogues; got {len(s.dialogues)}")
    s._check(metric)
    from scipy import stats as sps   # here, not at import (~0.6 s): the train stage uses this module's tables only

    fn = _statistic(s.stats, s.score, metric)
    res = sps.bootstrap((np.arange(len(s.dialogues)),), fn, n_resamples=n_resamples, confidence_level=confidence,
                        method=method, vectorized=True, axis=0, batch=_batch(s), rng=np.random.default_rng(seed))
    return {"metric": metric, "value": s.metric(metric), "low": float(res.confidence_interval.low),
            "high": float(res.confidence_interval.high), "se": float(res.standard_error),
            "confidence": confidence, "n_resamples": n_resamples, "dialogues": len(s.dialogues), "seed": seed}


def paired_test(a: DialogueStats, b: DialogueStats, metric: str, n_resamples: int = 2000,
                confidence: float = 0.95, seed: int = 0) -> dict:
    """Head A against head B on the same dialogues: the difference `diff` = metric(A) - metric(B), its paired
    bootstrap interval (`low`, `high`: A and B resampled with the same dialogues) and the two-sided p-value of
    approximate randomisation over dialogues (`p_value`; exact when 2^dialogues <= n_resamples)."""
    x, y = a.aligned(b)
    if len(x) < 2:
        raise SignificanceError(f"a paired test over dialogues needs 2 or more dialogues; got {len(x)}")
    a._check(metric)
    n = len(x)
    # indices into A's statistics (0..n-1) and B's (n..2n-1): a swap moves a dialogue's index to the other head
    fn = _statistic(np.concatenate([x, y]), a.score, metric)

    def diff(u, v, axis=-1):
        return fn(u, axis) - fn(v, axis)

    from scipy import stats as sps

    rng = np.random.default_rng(seed)
    ia, ib = np.arange(n), np.arange(n, 2 * n)
    boot = sps.bootstrap((ia, ib), diff, paired=True, n_resamples=n_resamples, confidence_level=confidence,
                         method="percentile", vectorized=True, axis=0, batch=_batch(a, 2), rng=rng)
    perm = sps.permutation_test((ia, ib), diff, permutation_type="samples", n_resamples=n_resamples,
                                vectorized=True, axis=0, batch=_batch(a, 2), rng=rng)
    return {"metric": metric, "diff": a.metric(metric) - b.metric(metric),
            "low": float(boot.confidence_interval.low), "high": float(boot.confidence_interval.high),
            "p_value": float(perm.pvalue), "dialogues": len(x), "n_resamples": n_resamples, "seed": seed}


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def runs_table(runs: list[dict]) -> pd.DataFrame:
    """One row per run (`{"fold": ..., "seed": ..., "metrics": {...}}`, e.g. a fold's and seed's test
    metrics), one column per numeric metric (nested keys joined by '.', e.g. `f1_per_class.sad`)."""
    if not runs:
        raise SignificanceError("no runs to summarise")
    rows = [{"fold": str(r["fold"]), "seed": r["seed"], **_flatten(r["metrics"])} for r in runs]
    table = pd.DataFrame(rows)
    dup = table.duplicated(["fold", "seed"])
    if dup.any():
        raise SignificanceError(f"run (fold {table.loc[dup, 'fold'].iloc[0]}, seed {table.loc[dup, 'seed'].iloc[0]}) "
                                "is given twice")
    return table


def fold_seed_summary(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per metric column of `runs_table`: `mean` and (population) `std` over all folds × seeds, `std_folds`
    (the spread of the per-fold means: how much the held-out data moves the score) and `std_seeds` (the
    mean within-fold spread over seeds: how much the initialisation does), `runs` counted."""
    out = {}
    for col in [c for c in table.columns if c not in ("fold", "seed")]:
        v = table[["fold", col]].dropna()
        per_fold = v.groupby("fold")[col]
        out[col] = {"mean": float(v[col].mean()), "std": float(v[col].std(ddof=0)),
                    "std_folds": float(per_fold.mean().std(ddof=0)),
                    "std_seeds": float(per_fold.std(ddof=0).mean()), "runs": int(len(v))}
    return out
