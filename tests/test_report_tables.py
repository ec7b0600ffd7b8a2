"""The report's CI, p-value, folds and claims tables from prediction tables as the train stage writes them."""
import numpy as np
import pandas as pd

from pipeline.report_tables import (claims_markdown, compact_columns, folds_markdown, reference_head, significance,
                                    significance_markdown)
from pipeline.significance import fold_seed_summary, runs_table

LABELS = ["joy", "sad", "neutral"]


def predictions(p_correct: float, seed: int, dialogues: int = 80, turns: int = 6) -> pd.DataFrame:
    """A predictions_test.csv of a head right with probability p_correct (same truth for every head)."""
    truth = np.random.default_rng(0).integers(0, 3, dialogues * turns)
    rng = np.random.default_rng(seed)
    right = rng.random(len(truth)) < p_correct
    pred = np.where(right, truth, (truth + rng.integers(1, 3, len(truth))) % 3)
    return pd.DataFrame({"utt_id": [f"u{i}" for i in range(len(truth))],
                         "label": np.array(LABELS)[truth], "prediction": np.array(LABELS)[pred]})


DIALOGUES = pd.Series({f"u{i}": f"d{i // 6}" for i in range(480)})


def test_ci_and_p_value_columns_against_the_best_dev_head():
    tables = {"weak": predictions(0.5, 1), "strong": predictions(0.85, 2), "strong_too": predictions(0.85, 3)}
    summaries = {"weak": {"dev": {"wf1": 0.5}, "test": {"wf1": 0.49}, "test_std": {"wf1": 0.01}},
                 "strong": {"dev": {"wf1": 0.8}, "test": {"wf1": 0.84}},
                 "strong_too": {"dev": {"wf1": 0.79}, "test": {"wf1": 0.86}}}   # best on test, not on dev
    ref = reference_head(summaries, "wf1")
    assert ref == "strong"
    rows = significance(tables, "wf1", ref, LABELS, dialogues=DIALOGUES, n_resamples=500, seed=0)
    assert rows["strong"]["p_value"] is None and rows["weak"]["p_value"] < 0.01
    assert rows["strong_too"]["p_value"] > 0.05
    assert rows["weak"]["low"] < rows["weak"]["value"] < rows["weak"]["high"] < rows["strong"]["low"]
    assert rows == significance(tables, "wf1", ref, LABELS, dialogues=DIALOGUES, n_resamples=500, seed=0)
    cols = compact_columns(rows["weak"], "wf1")
    assert set(cols) == {"test_wf1_ci_low", "test_wf1_ci_high", "test_wf1_diff_vs_ref", "test_wf1_p_vs_ref"}
    assert set(compact_columns(rows["strong"], "wf1")) == {"test_wf1_ci_low", "test_wf1_ci_high"}
    md = "\n".join(significance_markdown("toy", "wf1", rows, ref, summaries))
    assert "| strong | 0.8400 ± – |" in md and "(reference)" in md and "0.4900 ± 0.0100" in md
    assert "Δ vs strong [95% CI]" in md


def test_heads_not_comparable_get_a_note_not_a_p_value():
    other = predictions(0.7, 4).iloc[:200]   # scored on fewer dialogues
    rows = significance({"a": predictions(0.7, 1), "b": other}, "ua", "a", LABELS, dialogues=DIALOGUES,
                        n_resamples=200)
    assert rows["b"]["p_value"] is None and "same dialogues" in rows["b"]["note"]


def test_folds_and_claims_tables():
    runs = [{"fold": f"session{f}", "seed": s, "metrics": {"ua": 0.6 + 0.01 * f + 0.001 * s, "accuracy": 0.62}}
            for f in (1, 2, 3) for s in (0, 1)]
    summary = fold_seed_summary(runs_table(runs))
    md = "\n".join(folds_markdown("iemocap4", {"dialoguetrm": summary}, ["ua", "accuracy", "wf1"]))
    assert "| dialoguetrm | 6 | 0.6205 ± " in md and "| – |" in md and "UA | WA | WF1" in md
    claims = [{"head": "telme", "dataset": "iemocap", "protocol": "official", "metric": "wf1", "value": 70.48,
               "source": "arXiv:2401.12987 Table 2"}]
    md = "\n".join(claims_markdown(claims, {("iemocap", "telme"): {"wf1": {"mean": 0.6685, "std": 0.01,
                                                                        "low": 0.65, "high": 0.69}}}))
    assert "| 0.7048 | 0.6685 ± 0.0100 | [0.6500, 0.6900] | arXiv:2401.12987 Table 2 |" in md
    assert "| – | – |" in claims_markdown(claims, {})[-1]


def test_reference_is_lowest_mse():
    assert reference_head({"a": {"dev": {"mean_mse": 0.3}}, "b": {"dev": {"mean_mse": 0.2}}}, "mean_mse") == "b"
    assert reference_head({"a": {"test": {"wf1": 0.3}}}, "wf1") == "a" and reference_head({}, "wf1") is None


def test_dimensional_tables():
    rng = np.random.default_rng(0)
    t = rng.normal(0, 1, 240)
    tables = {h: pd.DataFrame({"utt_id": [f"u{i}" for i in range(240)],
                               "dialogue_id": [f"d{i // 8}" for i in range(240)],
                               "valence_true": t, "valence": k * t + rng.normal(0, 0.3, 240)})
              for h, k in (("good", 1.0), ("shrunk", 0.3))}
    rows = significance(tables, "mean_ccc", "good", dims=["valence"], n_resamples=300)
    assert rows["shrunk"]["diff"] < 0 and rows["shrunk"]["p_value"] < 0.01
    assert rows["good"]["low"] < rows["good"]["value"] < rows["good"]["high"] and rows["good"]["value"] > 0.9
