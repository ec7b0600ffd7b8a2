"""The demo pipeline through DVC itself: repro, metrics, per-stage invalidation, and sharing via a remote."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
       "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def sh(cwd, *cmd, check=True):
    out = subprocess.run(list(cmd), cwd=cwd, env=ENV, capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def dvc(cwd, *args, check=True):
    return sh(cwd, sys.executable, "-m", "dvc", *args, check=check)


def project_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if (REPO / f).is_file() and not f.startswith(("data/", "results/", "models/", "reports/"))
            and f not in ("dvc.lock",)]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh git + DVC project with this repo's code, the pipeline run once on a small sample."""
    root = tmp_path_factory.mktemp("proj") / "ercflow"
    for f in project_files():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, root / f)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sample"]["dialogues"] = 24
    params["trainer"]["epochs"] = 40
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "init")
    log = dvc(root, "repro")
    return root, log


def test_repro_runs_every_stage_and_fusion_beats_text(project):
    root, log = project
    for stage in ("make_sample", "prepare@sample", "decode@sample", "extract@sample-text_minilm",
                  "extract@sample-audio_egemaps", "extract@sample-visual_c3d", "train@sample-fusion_mlp",
                  "train@sample-text_mlp", "train@sample-dialoguetrm", "train@sample-telme",
                  "train@sample-matav", "finetune_text@sample-teacher_minilm", "report"):
        assert f"Running stage '{stage}'" in log
    metrics = json.loads(dvc(root, "metrics", "show", "--json"))
    flat = json.dumps(metrics)
    assert "fusion_mlp" in flat and "text_mlp" in flat
    wf1 = {h: json.loads((root / f"results/sample/{h}/metrics.json").read_text())["test"]["wf1"]
           for h in ("fusion_mlp", "text_mlp", "dialoguetrm", "dialoguetrm_text", "telme", "telme_text",
                     "matav", "matav_text")}
    # every multimodal head beats the same head's text-only setting on test WF1
    for multi, text in (("fusion_mlp", "text_mlp"), ("dialoguetrm", "dialoguetrm_text"), ("telme", "telme_text"),
                        ("matav", "matav_text")):
        assert wf1[multi] > wf1[text] + 0.02, wf1
    assert (root / "results/sample/fusion_mlp/confusion.png").stat().st_size > 1000
    assert "| sample | fusion_mlp |" in (root / "reports/report.md").read_text()
    dvc(root, "plots", "show", "-o", str(root.parent / "plots"))
    assert (root.parent / "plots" / "index.html").exists()


def test_editing_a_head_param_invalidates_only_that_head(project):
    root, _ = project
    assert json.loads(dvc(root, "status", "--json")) == {}
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["heads"]["text_mlp"]["options"]["hidden"] = 64
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = set(json.loads(dvc(root, "status", "--json")))
        assert changed == {"train@sample-text_mlp"}
        params["encoders"]["audio_egemaps"]["feature_set"] = "ComParE_2016"
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        changed = set(json.loads(dvc(root, "status", "--json")))
        assert changed == {"train@sample-text_mlp", "extract@sample-audio_egemaps"}
    finally:
        (root / "params.yaml").write_text(original)
    assert json.loads(dvc(root, "status", "--json")) == {}


def test_share_stores_through_a_remote(project, tmp_path):
    root, _ = project
    remote = tmp_path / "remote"
    dvc(root, "remote", "add", "-d", "-f", "team", str(remote))
    dvc(root, "push")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "pipeline results")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(root), str(clone))
    assert not (clone / "data/features/sample/text_minilm.h5").exists()
    dvc(clone, "pull")
    assert (clone / "data/features/sample/text_minilm.h5").exists()
    assert json.loads(dvc(clone, "status", "--json")) == {}
    log = dvc(clone, "repro")
    assert "Running stage" not in log, log
    assert "didn't change, skipping" in log


def test_training_again_gives_the_same_model(project):
    """`trainer.seed` fixes the head's initial weights as well as the batch order (last: it re-runs stages)."""
    root, _ = project
    out = root / "results/sample/text_mlp"
    before = json.loads((out / "metrics.json").read_text())
    predictions = (out / "predictions.csv").read_text()
    dvc(root, "repro", "-f", "-s", "train@sample-text_mlp")
    after = json.loads((out / "metrics.json").read_text())
    before.pop("seconds_per_epoch"), after.pop("seconds_per_epoch")
    assert after == before
    assert (out / "predictions.csv").read_text() == predictions
