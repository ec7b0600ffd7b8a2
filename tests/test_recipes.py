"""Every recipe applies cleanly onto params.yaml and builds its whole DVC graph (no weights, no data needed)."""
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from ercflow.check import check_params
from ercflow.recipe import apply_recipe, merge, recipe_names

EXPECTED = {   # recipe -> stages its graph must have (besides check and report)
    "meld-dialoguetrm": {"prepare@meld", "decode@meld", "extract@meld-audio_egemaps", "finetune_text@meld-bert_ctx",
                         "inputs@meld-dialoguetrm", "train@meld-dialoguetrm", "train@meld-dialoguetrm_text"},
    "meld-telme": {"extract@meld-audio_data2vec", "extract@meld-visual_timesformer",
                   "finetune_text@meld-roberta_prompt", "train@meld-telme", "train@meld-telme_text"},
    "meld-matav": {"extract@meld-text_roberta", "extract@meld-audio_wavlm", "extract@meld-visual_visextnet",
                   "train@meld-matav", "train@meld-matav_text"},
    "iemocap-dialoguetrm": {"prepare@iemocap", "finetune_text@iemocap-bert_ctx", "train@iemocap-dialoguetrm"},
    "iemocap-telme": {"finetune_text@iemocap-roberta_prompt", "train@iemocap-telme"},
    "iemocap-matav": {"extract@iemocap-audio_wavlm", "train@iemocap-matav"},
    "meld-telme-students": {"finetune_text@meld-roberta_prompt", "finetune_student@meld-audio_student",
                            "finetune_student@meld-visual_student", "train@meld-telme", "train@meld-telme_text"},
    "iemocap-telme-students": {"finetune_text@iemocap-roberta_prompt", "finetune_student@iemocap-audio_student",
                               "finetune_student@iemocap-visual_student", "train@iemocap-telme"},
    "meld-text-cpu": {"prepare@meld", "extract@meld-text_minilm", "extract@meld-text_minilm_ctx",
                      "finetune_text@meld-teacher_minilm", "train@meld-text_mlp", "train@meld-dialoguetrm_text",
                      "train@meld-telme_text", "train@meld-matav_text"},
    "meld-llm-lora": {"prepare@meld", "finetune_text@meld-llm_lora", "train@meld-text_mlp",
                      "train@meld-dialoguetrm_text", "train@meld-telme_text", "train@meld-matav_text"},
    "iemocap-llm-lora": {"prepare@iemocap", "finetune_text@iemocap-llm_lora", "train@iemocap-telme_text"},
    "meld-telme-llm": {"finetune_text@meld-llm_lora", "finetune_student@meld-audio_student",
                       "finetune_student@meld-visual_student", "train@meld-telme", "train@meld-telme_text"},
    "sample-llm-lora-cpu": {"make_sample@sample", "prepare@sample", "finetune_text@sample-llm_lora",
                            "train@sample-text_mlp"},
}
SAMPLE_RECIPES = {"sample-llm-lora-cpu"}   # run on the bundled sample (the rest on a real dataset)


def test_every_recipe_is_tested():
    assert set(recipe_names()) == set(EXPECTED)


def test_merge_merges_mappings_and_replaces_lists():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    assert merge(base, {"a": {"y": [3]}, "c": 4}) == {"a": {"x": 1, "y": [3]}, "b": 2, "c": 4}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_checks_and_builds_its_stages(tmp_path, name):
    params = apply_recipe(name, yaml.safe_load((REPO / "params.yaml").read_text()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert check_params(tmp_path / "params.yaml") == []
    if name not in SAMPLE_RECIPES:
        assert params["samples"] == [] and params["datasets"] != ["sample"]
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    stages = set(out.stdout.split())
    assert {"check", "report"} | EXPECTED[name] <= stages, sorted(stages)
    if name not in SAMPLE_RECIPES:
        assert not any(s.startswith("make_sample") or s.endswith("@sample") for s in stages)


def test_a_transcripts_recipe_is_text_only_over_the_demo_params():
    """The demo's params give MELD a media `root`; the CPU recipe's `csv_dir` must not inherit it (else every
    clip would be reported missing and decoded as absent, 13k times)."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    assert base["data"]["meld"].get("root")
    meld = apply_recipe("meld-text-cpu", base)["data"]["meld"]
    assert meld["csv_dir"] and meld.get("root") is None
