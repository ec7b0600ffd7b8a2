"""Issue #26 through `dvc repro` on the sample: a 3-fold protocol (k-fold by dialogue) whose report shows the mean
± std over folds and the CI column, and a cross-corpus stage between two synthetic datasets with a label map.
Small on purpose: one text head, the text encoder only, one seed."""
import json
import re

import pytest
import yaml

from conftest import copy_project, dvc, sh


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("proto") / "ercflow")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sample"]["dialogues"] = 24
    params.update(datasets=["sample", "sample_b"], samples=["sample", "sample_b"], extract=["text_minilm"],
                  teachers=[], train=["text_mlp"])
    params["data"]["sample"]["protocol"] = {"kind": "kfold", "folds": 3, "seed": 0}
    params["data"]["sample_b"] = {"adapter": "sample", "root": "data/raw/sample_b"}
    params["trainer"].update(epochs=15, seeds=[0])
    params["significance"]["n_resamples"] = 300
    params["cross_corpus"] = {"sample_to_b": {"train": "sample", "head": "text_mlp", "test": "sample_b",
                                              "model_map": {"joy": "emotional", "sadness": "emotional",
                                                            "anger": "emotional"}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "init")
    return root, dvc(root, "repro")


def test_a_three_fold_protocol_reports_mean_std_over_folds_and_the_ci(project):
    root, log = project
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    assert {"train@sample-text_mlp", "train@sample_b-text_mlp", "cross@sample_to_b", "report"} <= ran, ran
    metrics = json.loads((root / "results/sample/text_mlp/metrics.json").read_text())
    assert metrics["folds"] == ["fold1", "fold2", "fold3"] and len(metrics["per_run"]) == 3
    assert sorted(p.name for p in (root / "results/sample/text_mlp/runs").iterdir()) == \
        ["fold1-s0", "fold2-s0", "fold3-s0"]
    md = (root / "reports/report.md").read_text()
    assert "| sample | text_mlp | text | kfold | 3×1 |" in md and "| sample_b | text_mlp | text | official | 1×1 |" in md
    assert "Test scores on sample, mean ± std over folds × seeds" in md
    assert re.search(r"\| text_mlp \| 3 \| 0\.\d{4} ± 0\.\d{4} \(", md), md
    assert "WF1 [95% CI]" in md
    compact = json.loads(dvc(root, "metrics", "show", "--json"))
    flat = json.dumps(compact)
    assert "test_wf1_ci_low" in flat and "test_wf1_ci_high" in flat and '"folds": 3' in flat


def test_the_cross_corpus_stage_scores_the_bundle_on_the_other_dataset_with_the_label_map(project):
    root, _ = project
    got = json.loads((root / "results/cross/sample_to_b/metrics.json").read_text())
    assert got["labels"] == ["neutral", "emotional"] and got["test"] == "sample_b"
    md = (root / "reports/report.md").read_text()
    assert "| sample_to_b | sample/text_mlp | sample_b (test) | neutral, emotional | WF1 |" in md
    assert json.loads(dvc(root, "status", "--json")) == {}
    # a protocol edit re-runs that dataset's train stage (and the report), not the other dataset's
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["sample"]["protocol"]["folds"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(json.loads(dvc(root, "status", "--json")))
    assert "train@sample-text_mlp" in changed and "train@sample_b-text_mlp" not in changed, changed
