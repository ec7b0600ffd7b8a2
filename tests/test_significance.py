"""The dialogue bootstrap and the paired test: reproducible with their seed, intervals that cover a known
difference, p-values small for a clearly better head and large for the same head; mean ± std over folds × seeds."""
import numpy as np
import pandas as pd
import pytest

from pipeline.metrics import classification_metrics, regression_metrics
from pipeline.significance import (SignificanceError, bootstrap_ci, categorical_stats, dimensional_stats,
                                   fold_seed_summary, paired_test, runs_table, table_stats)

C = 4


def synthetic(p_correct: float, dialogues: int = 150, turns: int = 8, seed: int = 0, spread: float = 0.0,
              y=None, dia=None):
    """Class ids of `dialogues` dialogues: a head right with probability `p_correct` (moved per dialogue by
    up to ± `spread`: dialogues easy or hard as a whole), and wrong with another class otherwise, so its
    expected accuracy is exactly p_correct."""
    rng = np.random.default_rng(seed)
    n = dialogues * turns
    if dia is None:
        dia = np.repeat(np.arange(dialogues), turns).astype(str)
    if y is None:
        y = rng.integers(0, C, n)
    shift = rng.uniform(-spread, spread, dialogues)[np.repeat(np.arange(dialogues), turns)]
    right = rng.random(n) < np.clip(p_correct + shift, 0, 1)
    pred = np.where(right, y, (y + rng.integers(1, C, n)) % C)
    return y, pred, dia


def test_point_value_is_the_metric_and_the_bootstrap_is_seeded():
    y, p, dia = synthetic(0.7)
    s = categorical_stats(y, p, dia, C)
    want = classification_metrics(y, p, list("abcd"))
    for k in ("wf1", "macro_f1", "accuracy", "ua"):
        assert s.metric(k) == pytest.approx(want[k])
    a, b = bootstrap_ci(s, "wf1", seed=5), bootstrap_ci(s, "wf1", seed=5)
    assert a == b
    c = bootstrap_ci(s, "wf1", seed=6)
    assert (c["low"], c["high"]) != (a["low"], a["high"])
    assert a["low"] < a["value"] < a["high"] and a["dialogues"] == 150
    with pytest.raises(SignificanceError, match="mean_ccc"):
        bootstrap_ci(s, "mean_ccc")


def test_the_interval_covers_the_true_accuracy_and_resamples_dialogues():
    """Expected accuracy 0.7 by construction: the 95% interval covers it in most of 40 replicates (a binomial
    lower bound); with dialogues easy or hard as a whole, resampling dialogues widens the interval over
    resampling utterances (which would claim more certainty than the data hold)."""
    covered = 0
    for rep in range(40):
        y, p, dia = synthetic(0.7, dialogues=60, seed=100 + rep, spread=0.25)
        ci = bootstrap_ci(categorical_stats(y, p, dia, C), "accuracy", n_resamples=500, seed=rep)
        covered += ci["low"] <= 0.7 <= ci["high"]
    assert covered >= 34   # P(X < 34) < 1% for X ~ Binomial(40, 0.95)
    y, p, dia = synthetic(0.7, dialogues=60, seed=1, spread=0.3)
    by_dialogue = bootstrap_ci(categorical_stats(y, p, dia, C), "accuracy", seed=0)
    by_utterance = bootstrap_ci(categorical_stats(y, p, np.arange(len(y)).astype(str), C), "accuracy", seed=0)
    assert by_dialogue["value"] == by_utterance["value"]
    assert by_dialogue["high"] - by_dialogue["low"] > 1.3 * (by_utterance["high"] - by_utterance["low"])


def test_paired_test_finds_a_clearly_better_head_and_not_the_same_one():
    y, good, dia = synthetic(0.8, seed=1)
    _, bad, _ = synthetic(0.6, seed=2, y=y, dia=dia)
    _, twin, _ = synthetic(0.8, seed=3, y=y, dia=dia)   # as good, other mistakes
    a, b, t = (categorical_stats(y, p, dia, C) for p in (good, bad, twin))
    better = paired_test(a, b, "accuracy", seed=0)
    assert better["diff"] == pytest.approx(a.metric("accuracy") - b.metric("accuracy"))
    assert better["low"] <= 0.2 <= better["high"]          # the known difference of expected accuracy
    assert better["p_value"] < 0.01
    same = paired_test(a, a, "accuracy", seed=0)
    assert same["diff"] == 0 and same["p_value"] == pytest.approx(1.0)
    assert paired_test(a, t, "accuracy", seed=0)["p_value"] > 0.05
    assert paired_test(a, b, "accuracy", seed=0) == better   # seeded
    # dialogues matched by id, whatever order each table came in
    order = np.random.default_rng(0).permutation(len(y))
    shuffled = categorical_stats(y[order], bad[order], dia[order], C)
    assert paired_test(a, shuffled, "accuracy", seed=0) == better
    with pytest.raises(SignificanceError, match="same dialogues"):
        paired_test(a, categorical_stats(y[:80], bad[:80], dia[:80], C), "accuracy")


def test_dimensional_ccc_interval():
    rng = np.random.default_rng(0)
    t = rng.normal(0, 1, (400, 2))
    p = 0.8 * t + rng.normal(0, 0.4, (400, 2))
    dia = np.repeat(np.arange(50), 8).astype(str)
    s = dimensional_stats(t + 5.0, p + 5.0, dia)   # a common offset changes nothing
    assert s.metric("mean_ccc") == pytest.approx(regression_metrics(t, p, ["v", "a"])["mean_ccc"])
    ci = bootstrap_ci(s, "mean_ccc", seed=0)
    assert ci["low"] < ci["value"] < ci["high"] and ci["high"] - ci["low"] < 0.2
    worse = dimensional_stats(t + 5.0, 0.3 * p + 5.0, dia)   # shrunk towards the mean: CCC falls, r does not
    assert worse.metric("mean_r") == pytest.approx(s.metric("mean_r"))
    assert paired_test(s, worse, "mean_ccc", seed=0)["p_value"] < 0.01


def test_table_stats_from_prediction_tables():
    table = pd.DataFrame({"utt_id": ["u1", "u2", "u3", "u4"], "label": ["x", "y", "x", "y"],
                          "prediction": ["x", "x", "x", "y"]})
    dialogues = pd.Series({"u1": "d1", "u2": "d1", "u3": "d2", "u4": "d2"})
    s = table_stats(table, ["x", "y"], dialogues=dialogues)
    assert list(s.dialogues) == ["d1", "d2"] and s.metric("accuracy") == pytest.approx(0.75)
    with_column = table.assign(dialogue_id=["d1", "d1", "d2", "d2"])
    assert table_stats(with_column, ["x", "y"]).metric("ua") == pytest.approx(0.75)
    with pytest.raises(SignificanceError, match="'u4'"):
        table_stats(table, ["x", "y"], dialogues=dialogues.drop("u4"))
    with pytest.raises(SignificanceError, match="dialogue_id"):
        table_stats(table, ["x", "y"])


def test_mean_and_std_over_folds_and_seeds():
    runs = [{"fold": f, "seed": s, "metrics": {"wf1": w, "f1_per_class": {"a": w / 2}}}
            for (f, s, w) in [("fold1", 0, 0.5), ("fold1", 1, 0.7), ("fold2", 0, 0.6), ("fold2", 1, 0.6)]]
    table = runs_table(runs)
    assert list(table.columns) == ["fold", "seed", "wf1", "f1_per_class.a"] and len(table) == 4   # kept per run
    summary = fold_seed_summary(table)["wf1"]
    assert summary["mean"] == pytest.approx(0.6) and summary["runs"] == 4
    assert summary["std"] == pytest.approx(np.std([0.5, 0.7, 0.6, 0.6]))
    assert summary["std_folds"] == pytest.approx(0.0)                 # both folds average 0.6
    assert summary["std_seeds"] == pytest.approx((0.1 + 0.0) / 2)     # fold1's seeds differ by ± 0.1
    with pytest.raises(SignificanceError, match="fold1, seed 0"):
        runs_table(runs + runs[:1])
