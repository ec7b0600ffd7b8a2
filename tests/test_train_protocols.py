"""Issue #26 wired in: the train stage under a protocol (folds × seeds, resumable runs, the label map before
training and scoring, the kept bundle the best on dev), the report's mean ± std over folds and CI columns,
the cross-corpus stage through predict's code path, and `ercflow check` on the new params."""
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from conftest import store_from, synthetic_manifest


def project(tmp_path, monkeypatch, protocol=None, seeds=(0, 1), epochs=3, n_dialogues=18, heads=("text_mlp",)):
    """A synthetic dataset `syn` whose text feature carries the label, and params training `heads` on it."""
    m = synthetic_manifest(n_dialogues=n_dialogues)
    monkeypatch.chdir(tmp_path)
    m.save("data/manifest/syn")
    rng = np.random.default_rng(0)
    store_from(m, tmp_path / "data/features/syn/text_minilm.h5",
               lambda r: np.r_[rng.normal(size=3), "abc".index(r["label"]) + rng.normal(0, 0.8)], 4)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(datasets=["syn"], train=list(heads))
    params["data"]["syn"] = {"adapter": "generic", "manifest": "x.csv"}
    if protocol is not None:
        params["data"]["syn"]["protocol"] = protocol
    params["trainer"].update(seeds=list(seeds), epochs=epochs, device="cpu")
    params["significance"] = {"n_resamples": 200, "seed": 0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return m, params


def test_kfold_trains_every_fold_and_seed_keeps_the_best_dev_run_and_resumes(tmp_path, monkeypatch):
    from heads.bundle import load_head
    from stages import report, train

    m, params = project(tmp_path, monkeypatch, {"kind": "kfold", "folds": 3, "seed": 0})
    train.main(["--dataset", "syn", "--head", "text_mlp"])
    out = tmp_path / "results/syn/text_mlp"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["folds"] == ["fold1", "fold2", "fold3"] and metrics["seeds"] == [0, 1]
    assert [(r["fold"], r["seed"]) for r in metrics["per_run"]] == [(f, s) for f in metrics["folds"] for s in (0, 1)]
    tests = [r["test"]["wf1"] for r in metrics["per_run"]]
    assert metrics["test"]["wf1"] == pytest.approx(np.mean(tests)) and metrics["test_std"]["wf1"] == pytest.approx(np.std(tests))
    assert metrics["folds_summary"]["wf1"]["runs"] == 6 and "ua" in metrics["folds_summary"]
    # the kept run is the best on dev over every fold and seed; its bundle is the model
    best = max(metrics["per_run"], key=lambda r: r["dev"]["wf1"])
    assert (metrics["kept_fold"], metrics["kept_seed"]) == (best["fold"], best["seed"])
    _, meta = load_head(tmp_path / "models/syn/text_mlp.safetensors")
    assert (meta["fold"], meta["seed"]) == (best["fold"], best["seed"])
    assert [p.name for p in (out / "runs").glob("*/bundle.safetensors")] == ["bundle.safetensors"]
    # out-of-fold test predictions: every utterance once, with its dialogue and fold
    test = pd.read_csv(out / "predictions_test.csv", dtype=str)
    assert sorted(test["utt_id"]) == sorted(m.rows["utt_id"]) and test["fold"].nunique() == 3
    assert (test["dialogue_id"] == test["utt_id"].str.split("u").str[0]).all()
    assert test.groupby("dialogue_id")["fold"].nunique().max() == 1
    assert "pooled_test" in metrics

    # the report: mean ± std over folds × seeds, the CI column, the compact metrics with CI bounds
    report.main([])
    md = (tmp_path / "reports/report.md").read_text()
    assert "mean ± std over folds × seeds" in md and "[95% CI]" in md and "| syn | text_mlp | text | kfold | 3×2 |" in md
    compact = json.loads((tmp_path / "reports/metrics.json").read_text())["syn"]["text_mlp"]
    assert compact["folds"] == 3 and compact["test_wf1_ci_low"] <= compact["test_wf1_ci_high"]

    # a stage stopped before its end (no metrics.json yet) resumes: done runs are not trained again
    before = (out / "metrics.json").read_text(), (out / "predictions_test.csv").read_text()
    (out / "metrics.json").unlink()
    monkeypatch.setattr(train, "fit_head", lambda *a, **k: pytest.fail("a done run was trained again"))
    train.main(["--dataset", "syn", "--head", "text_mlp"])
    assert ((out / "metrics.json").read_text(), (out / "predictions_test.csv").read_text()) == before

    # a run stopped before its end (no done.json) is the only one trained again
    from heads.fit import fit_head

    trained = []
    monkeypatch.setattr(train, "fit_head", lambda hp, tr, data, **k: trained.append(tr.seed) or fit_head(hp, tr, data, **k))
    (out / "runs/fold2-s1/done.json").unlink()
    (out / "metrics.json").unlink()
    train.main(["--dataset", "syn", "--head", "text_mlp"])
    assert trained == [1] and json.loads((out / "metrics.json").read_text())["per_run"] == metrics["per_run"]
    # the stage run again after it finished (`dvc repro -f`): every run is trained again, to the same numbers
    trained.clear()
    train.main(["--dataset", "syn", "--head", "text_mlp"])
    assert trained == [0, 1] * 3 and json.loads((out / "metrics.json").read_text())["per_run"] == metrics["per_run"]

    # fewer seeds: their runs' folders go (the best seed-0 run is trained again for its model only when a
    # seed-1 run had beaten it); a changed trainer setting trains every run again
    params["trainer"]["seeds"] = [0]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    trained.clear()
    train.main(["--dataset", "syn", "--head", "text_mlp"])
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["fold1-s0", "fold2-s0", "fold3-s0"]
    assert trained == ([] if metrics["kept_seed"] == 0 else [0])
    assert (tmp_path / "models/syn/text_mlp.safetensors").exists()
    params["trainer"]["lr"] = 5e-3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    trained.clear()
    train.main(["--dataset", "syn", "--head", "text_mlp"])
    assert trained == [0, 0, 0]


def test_official_is_one_fold_and_the_predictions_carry_dialogues(tmp_path, monkeypatch):
    from stages import train

    m, _ = project(tmp_path, monkeypatch, seeds=(0,))
    train.main(["--dataset", "syn", "--head", "text_mlp"])
    out = tmp_path / "results/syn/text_mlp"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "official" and metrics["folds"] == ["official"] and set(metrics["per_seed"]) == {"0"}
    test = pd.read_csv(out / "predictions_test.csv", dtype=str)
    want = m.rows[m.rows["split"] == "test"]
    assert list(test.columns[:3]) == ["utt_id", "dialogue_id", "label"] and "fold" not in test.columns
    assert list(test["utt_id"]) == list(want["utt_id"]) and list(test["dialogue_id"]) == list(want["dialogue_id"])


def test_the_label_map_is_applied_before_training_and_scoring(tmp_path, monkeypatch):
    from heads.bundle import load_head
    from pipeline.protocols import ProtocolError
    from stages import train

    m, params = project(tmp_path, monkeypatch, {"label_map": {"b": "a"}}, seeds=(0,))
    train.main(["--dataset", "syn", "--head", "text_mlp"])
    out = tmp_path / "results/syn/text_mlp"
    _, meta = load_head(tmp_path / "models/syn/text_mlp.safetensors")
    assert meta["labels"] == ["a", "c"]
    test = pd.read_csv(out / "predictions_test.csv", dtype=str)
    assert set(test["label"]) <= {"a", "c"} and [c for c in test.columns if c.startswith("p_")] == ["p_a", "p_c"]
    assert (test["label"] == "a").sum() == m.rows[m.rows["split"] == "test"]["label"].isin(["a", "b"]).sum()
    assert set(json.loads((out / "metrics.json").read_text())["test"]["f1_per_class"]) == {"a", "c"}
    # a class the data does not have: an error naming the params key (generic data: found when applied)
    params["data"]["syn"]["protocol"] = {"label_map": {"z": "a"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ProtocolError, match=r"data\.syn\.protocol\.label_map: \['z'\]"):
        train.main(["--dataset", "syn", "--head", "text_mlp"])


def test_check_names_the_bad_protocol_and_label_map_keys(tmp_path):
    from ercflow.check import check_params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["sample"]["protocol"] = "loso"
    params["data"]["meld"]["protocol"] = {"kind": "kfold", "folds": 5, "label_map": {"happy": "joy"}}
    params["data"]["iemocap"]["protocol"] = "iemocap4_loso"   # fine: IEMOCAP's classes
    params["cross_corpus"] = {"m2s": {"train": "iemocap", "head": "text_mlp", "test": "sample",   # IEMOCAP-4's
                                      "model_map": {"happy": "joy", "excited": "joy"}}}   # model has no 'excited'
    params["headline"] = {"sample": ["wf1", "mean_ccc"]}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    problems = check_params(path)
    assert any(p.startswith("data.sample.protocol") and "'loso'" in p and "iemocap4_loso" in p for p in problems)
    assert any(p.startswith("data.meld.protocol.label_map: ['happy']") for p in problems), problems
    assert any(p.startswith("cross_corpus.m2s.model_map: ['excited']") for p in problems), problems
    # iemocap is not in `datasets`: the pipeline would not train the bundle the cross stage scores
    assert any(p.startswith("cross_corpus.m2s.train: 'iemocap' is not in `datasets`") for p in problems), problems
    assert any(p.startswith("headline.sample:") for p in problems) and len(problems) == 5, problems
    params["data"]["meld"]["protocol"] = {"kind": "kfold"}   # kfold without folds
    params["data"]["sample"]["protocol"] = "iemocap4_loso"   # the sample has no 'excited'
    del params["cross_corpus"], params["headline"]
    path.write_text(yaml.safe_dump(params))
    problems = check_params(path)
    assert any(p.startswith("data.meld.protocol") and "folds >= 2" in p for p in problems), problems
    assert any(p.startswith("data.sample.protocol (iemocap4_loso)") and "'excited'" in p for p in problems), problems


def test_the_adapters_classes_are_the_ones_check_knows():
    from pipeline.datasets import iemocap, meld, sample
    from pipeline.params.evaluation import ADAPTER_LABELS

    assert ADAPTER_LABELS == {"sample": sample.LABELS, "meld": meld.LABELS, "iemocap": iemocap.LABELS}


def test_cross_corpus_scores_a_bundle_on_another_dataset_with_a_label_map(tmp_path, monkeypatch, tiny_bert):
    """Two synthetic datasets: a text head trained on one is scored on the other's test split through
    `ercflow predict`'s code path, with its classes merged by the label map; the report gets its table."""
    from pipeline.encoders import build_encoder
    from pipeline.extract import extract
    from stages import cross, report, train

    words = "happy sad cake letter monday great furious love lost okay".split()
    m, params = project(tmp_path, monkeypatch, seeds=(0,), epochs=4)
    rng = np.random.default_rng(0)
    m.rows["text"] = [f"{words[3 * 'abc'.index(y)]} {' '.join(rng.choice(words, 2))}" for y in m.rows["label"]]
    m.save("data/manifest/syn")
    extract(m, build_encoder("text_minilm", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu",
                                             "pooling": "mean"}), tmp_path / "data/features/syn/text_minilm.h5")
    other = synthetic_manifest(n_dialogues=10, seed=5)
    other.rows["text"] = [f"{words[3 * 'abc'.index(y)]} okay" for y in other.rows["label"]]
    other.rows["dataset"] = "syn2"
    other.rows["label"] = other.rows["label"].map({"a": "x", "b": "y", "c": "z"})
    other.meta.dataset, other.meta.labels = "syn2", ["x", "y", "z"]
    other.save("data/manifest/syn2")
    params["data"]["syn2"] = {"adapter": "generic", "manifest": "y.csv", "labels": ["x", "y", "z"]}
    params["datasets"] = [*params["datasets"], "syn2"]   # a cross-corpus test set is one the pipeline prepares
    params["cross_corpus"] = {"syn_to_syn2": {"train": "syn", "head": "text_mlp", "test": "syn2",
                                              "model_map": {"a": "ab", "b": "ab", "c": None},
                                              "data_map": {"x": "ab", "y": "ab", "z": None}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    train.main(["--dataset", "syn", "--head", "text_mlp"])
    cross.main(["--name", "syn_to_syn2"])
    out = tmp_path / "results/cross/syn_to_syn2"
    got = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    test = other.rows[other.rows["split"] == "test"]
    assert got["labels"] == ["ab"] and got["model_labels"] == ["a", "b", "c"]
    assert list(table["utt_id"]) == list(test["utt_id"]) and "dialogue_id" in table.columns
    assert (table["label"] == "ab").sum() == test["label"].isin(["x", "y"]).sum() and set(table["label"]) <= {"ab", ""}
    assert got["metrics"]["support"] == (table["label"] == "ab").sum()
    # the model is asked among "ab" only; p_ab is its mass on a + b (the rest went to the dropped c)
    assert (table["prediction"] == "ab").all() and ((table["p_ab"] > 0) & (table["p_ab"] < 1)).all()
    # with its classes kept apart the model is scored on the classes both share after the data map
    params["cross_corpus"]["syn_to_syn2"].update(model_map={}, data_map={"x": "a", "y": "b", "z": "c"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cross.main(["--name", "syn_to_syn2"])
    got = json.loads((out / "metrics.json").read_text())
    assert got["labels"] == ["a", "b", "c"] and got["metrics"]["support"] == len(test)
    report.main([])
    md = (tmp_path / "reports/report.md").read_text()
    assert "Cross-corpus" in md and "| syn_to_syn2 | syn/text_mlp | syn2 (test) | a, b, c | WF1 |" in md
    assert "test_wf1_ci_low" in json.loads((tmp_path / "reports/metrics.json").read_text())["cross_corpus"]["syn_to_syn2"]
