"""The field's metrics against hand computations on small arrays, and the vectorised (bootstrap) forms
against the per-call ones."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from pipeline.metrics import (MetricError, ccc, classification_metrics, confusion_scores, headline_metric,
                              moment_scores, moments, regression_metrics, score_table)

# cm = [[2, 1, 0], [0, 1, 1], [0, 0, 1]]: recall 2/3, 1/2, 1; precision 1, 1/2, 1/2; F1 4/5, 1/2, 2/3
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])


def test_classification_by_hand():
    m = classification_metrics(Y_TRUE, Y_PRED, ["a", "b", "c"])
    assert m["ua"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)            # 13/18: mean per-class recall
    assert m["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)  # 59/90
    assert m["wf1"] == pytest.approx((3 * 4 / 5 + 2 * 1 / 2 + 1 * 2 / 3) / 6)   # 61/90: weighted by support
    assert m["accuracy"] == pytest.approx(4 / 6)                          # WA
    assert m["recall_per_class"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    assert m["f1_per_class"] == pytest.approx({"a": 0.8, "b": 0.5, "c": 2 / 3})
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # UA and WA differ when classes are unbalanced: UA weighs the rare class as much as the common one
    assert m["ua"] != pytest.approx(m["accuracy"])


def test_a_class_absent_from_a_fold_neither_helps_nor_hurts():
    """A fourth class nobody has or predicts: UA and macro F1 as sklearn's defaults (balanced accuracy,
    macro over the labels seen), not dragged down by a 0 for the absent class."""
    m = classification_metrics(Y_TRUE, Y_PRED, ["a", "b", "c", "d"])
    assert m["ua"] == pytest.approx(13 / 18) and m["macro_f1"] == pytest.approx(59 / 90)
    assert m["ua"] == pytest.approx(balanced_accuracy_score(Y_TRUE, Y_PRED))
    assert m["macro_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro"))
    # predicted but never true: counts in macro F1 (a 0), not in UA
    pred = Y_PRED.copy()
    pred[0] = 3
    m = classification_metrics(Y_TRUE, pred, ["a", "b", "c", "d"])
    assert m["macro_f1"] == pytest.approx(f1_score(Y_TRUE, pred, average="macro"))
    assert m["ua"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)


def test_ccc_by_hand():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    # a shift of +1: perfectly correlated (r = 1) but not concordant: 2 * 1.25 / (1.25 + 1.25 + 1)
    assert ccc(t, t + 1) == pytest.approx(2.5 / 3.5)
    assert ccc(t, t) == pytest.approx(1.0) and ccc(t, 5 - t) == pytest.approx(-1.0)
    # a scale: r stays 1, CCC drops: var p = 5, cov = 2.5, means 2.5 vs 5
    assert ccc(t, 2 * t) == pytest.approx(2 * 2.5 / (1.25 + 5 + 2.5 ** 2))
    m = regression_metrics(np.c_[t, t], np.c_[t + 1, t], ["valence", "arousal"])
    assert m["valence"]["pearson_r"] == pytest.approx(1.0) and m["valence"]["mse"] == pytest.approx(1.0)
    assert m["valence"]["ccc"] == pytest.approx(2.5 / 3.5) and m["arousal"]["ccc"] == pytest.approx(1.0)
    assert m["mean_ccc"] == pytest.approx((2.5 / 3.5 + 1) / 2) and m["mean_mse"] == pytest.approx(0.5)


def test_vectorised_forms_match_the_per_call_metrics():
    rng = np.random.default_rng(0)
    for c in (2, 4, 7):
        y, p = rng.integers(0, c, 300), rng.integers(0, c, 300)
        p[:10] = c   # predictions outside the classes: the extra column, always wrong
        cm = np.zeros((c, c + 1))
        np.add.at(cm, (y, p), 1)
        want = classification_metrics(y, p, [str(i) for i in range(c)])
        got = confusion_scores(cm)
        for k in ("wf1", "macro_f1", "accuracy", "ua"):
            assert got[k] == pytest.approx(want[k], abs=1e-12), k
    t = rng.normal(3.0, 1.0, (200, 3))
    p = 0.5 * t + rng.normal(0, 0.5, (200, 3))
    t[::7, 1] = np.nan
    want = regression_metrics(t, p, ["a", "b", "c"])
    got = moment_scores(moments(t, p, shift=np.nanmean(t, 0)))
    for j, d in enumerate("abc"):
        assert got["ccc"][j] == pytest.approx(want[d]["ccc"]) and got["mse"][j] == pytest.approx(want[d]["mse"])
        assert got["pearson_r"][j] == pytest.approx(want[d]["pearson_r"])
    # batched: a stack of confusion matrices scores each
    stack = np.stack([np.eye(3) * 5, np.ones((3, 3))])
    assert confusion_scores(np.concatenate([stack, np.zeros((2, 3, 1))], -1))["accuracy"] == pytest.approx([1, 1 / 3])


def test_headline_metric_defaults_and_override():
    assert headline_metric("meld") == ("wf1",) and headline_metric("EmoryNLP") == ("wf1",)
    assert headline_metric("iemocap", n_classes=6) == ("wf1",)
    assert headline_metric("iemocap", n_classes=4) == ("ua", "accuracy")
    assert headline_metric("avec", task="dimensional") == ("mean_ccc",)
    assert headline_metric("my_corpus") == ("wf1",) and headline_metric("x", task="dimensional") == ("mean_ccc",)
    assert headline_metric("meld", override=["macro_f1"]) == ("macro_f1",)
    with pytest.raises(MetricError, match="ccc.*categorical"):
        headline_metric("meld", override=["ccc"])


def test_score_table_leaves_out_unscored_rows():
    table = pd.DataFrame({"utt_id": list("abcd"), "label": ["x", "y", "", "x"], "prediction": ["x", "x", "y", "z"]})
    m = score_table(table, ["x", "y"])
    assert m["support"] == 3 and m["accuracy"] == pytest.approx(1 / 3)   # 'z' is outside the classes: wrong
    with pytest.raises(MetricError, match="lacks"):
        score_table(table.drop(columns="prediction"), ["x", "y"])


def test_classification_metrics_equal_scikit_learns_on_random_labels():
    """The metrics come from the confusion matrix (no scikit-learn import in a stage); on random labels, with
    predictions outside the classes and constant predictions, they equal scikit-learn's to float precision."""
    from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

    rng = np.random.default_rng(0)
    for trial in range(300):
        c, n = int(rng.integers(1, 8)), int(rng.integers(1, 40))
        y, p = rng.integers(0, c, n), rng.integers(0, c + 1, n)   # c: outside the classes
        if trial % 5 == 0:
            p[:] = y[0]
        classes = list(range(c))
        m = classification_metrics(y, p, [str(k) for k in classes])
        per_class = f1_score(y, p, labels=classes, average=None, zero_division=0)
        recall = recall_score(y, p, labels=classes, average=None, zero_division=0)
        assert m["wf1"] == pytest.approx(f1_score(y, p, labels=classes, average="weighted", zero_division=0), abs=1e-12)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
        assert list(m["f1_per_class"].values()) == pytest.approx(per_class, abs=1e-12)
        assert list(m["recall_per_class"].values()) == pytest.approx(recall, abs=1e-12)
        assert m["confusion"] == confusion_matrix(y, p, labels=classes).tolist()
        assert m["ua"] == pytest.approx(recall[np.isin(classes, y)].mean(), abs=1e-12)
    with pytest.raises(MetricError, match="nothing to score"):
        classification_metrics(np.array([], int), np.array([], int), ["a"])
