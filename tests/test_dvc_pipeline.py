"""The demo pipeline through DVC itself: repro, metrics, per-stage invalidation, and sharing via a remote."""
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ENV, dvc, flip_middle, sh


def test_repro_runs_every_stage_and_fusion_beats_text(project):
    root, log = project
    for stage in ("make_sample@sample", "prepare@sample", "decode@sample", "extract@sample-text_minilm",
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
        # `check` reads all of params.yaml, so any edit re-runs it (a second); its output stays the same, so it
        # re-runs nothing downstream; `inputs@...` lists the head's stores and is unchanged too
        changed = set(json.loads(dvc(root, "status", "--json")))
        assert changed == {"check", "inputs@sample-text_mlp", "train@sample-text_mlp"}
        params["encoders"]["audio_egemaps"]["feature_set"] = "ComParE_2016"
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        changed = set(json.loads(dvc(root, "status", "--json")))
        assert changed == {"check", "inputs@sample-text_mlp", "train@sample-text_mlp", "extract@sample-audio_egemaps"}
        params["encoders"]["audio_egemaps"]["feature_set"] = "eGeMAPSv02"
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        ran = set(re.findall(r"Running stage '([^']+)'", dvc(root, "repro")))
        assert ran == {"check", "inputs@sample-text_mlp", "train@sample-text_mlp", "report"}
    finally:
        (root / "params.yaml").write_text(original)
    dvc(root, "repro")
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


def ercflow_cli(root, *args, check=True):
    return sh(root, sys.executable, "-m", "ercflow", *args, check=check)


def transcript_of_test_dialogues(root, columns=("utt_id", "dialogue_id", "turn", "speaker", "text", "video", "audio")):
    """The sample's test dialogues as a bare conversation table: no labels, no splits."""
    rows = pd.read_csv(root / "data/manifest/sample/manifest.csv", dtype=str, keep_default_na=False)
    return rows.loc[rows["split"] == "test", [c for c in columns if c in rows.columns]]


@pytest.mark.parametrize("head", ["fusion_mlp", "dialoguetrm", "matav", "telme_text"])
def test_predict_reproduces_the_train_stage(project, tmp_path, head):
    """`ercflow predict` on the test dialogues' transcript + media gives the train stage's test predictions:
    the same stores rebuilt from the bundle's recipes, the same normalisation, the same head."""
    root, _ = project
    table = transcript_of_test_dialogues(root)
    table.to_csv(tmp_path / "talk.csv", index=False)
    ercflow_cli(root, "predict", "--model", f"models/sample/{head}.safetensors", "--input", str(tmp_path / "talk.csv"),
                "--media-root", "data/raw/sample", "--out", str(tmp_path / "pred.csv"), "--work-dir", str(tmp_path / "w"))
    got = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False)
    want = pd.read_csv(root / f"results/sample/{head}/predictions_test.csv")
    assert list(got["utt_id"]) == list(table["utt_id"]) == list(want["utt_id"])
    assert (got["prediction"] == want["prediction"]).all()
    probs = [c for c in want.columns if c.startswith("p_")]
    assert probs and np.abs(got[probs].to_numpy() - want[probs].to_numpy()).max() < 1e-5
    assert np.allclose(got[probs].sum(axis=1), 1.0)
    assert set(got.columns) >= {"dialogue_id", "turn", "speaker", "problems"}


def test_predict_text_only_model_on_a_bare_transcript_and_cached_work(project, tmp_path):
    root, _ = project
    table = transcript_of_test_dialogues(root, ("dialogue_id", "turn", "speaker", "text"))   # no media, no utt_id
    table.to_csv(tmp_path / "talk.csv", index=False)
    args = ("predict", "--model", "models/sample/text_mlp.safetensors", "--input", str(tmp_path / "talk.csv"),
            "--out", str(tmp_path / "pred.csv"), "--work-dir", str(tmp_path / "w"))
    ercflow_cli(root, *args)
    first = (tmp_path / "pred.csv").read_text()
    stores = sorted((tmp_path / "w").rglob("*.h5"))
    assert [p.parent.name for p in stores] == ["features"] and not list((tmp_path / "w").rglob("media.h5"))
    stamps = [p.stat().st_mtime_ns for p in stores]
    ercflow_cli(root, *args)                       # the same input: its stores are reused, not recomputed
    assert [p.stat().st_mtime_ns for p in stores] == stamps and (tmp_path / "pred.csv").read_text() == first
    got = pd.read_csv(tmp_path / "pred.csv")
    assert list(got["utt_id"]) == [f"{d}_{t}" for d, t in zip(table["dialogue_id"], table["turn"])]


def test_predict_masks_a_missing_clip_and_refuses_other_weights(project, tmp_path):
    from heads.bundle import load_head, save_head
    from ercflow.model import WeightsMismatch, load_model

    root, _ = project
    table = transcript_of_test_dialogues(root)
    first = table.index[0]
    table.loc[first, "video"] = table.loc[first, "audio"] = "clips/not_there.mp4"
    model = load_model(root / "models/sample/fusion_mlp.safetensors", work_dir=tmp_path / "w")
    got = model.predict(table, media_root=root / "data/raw/sample")
    assert "visual" in got.loc[0, "problems"] and "missing" in got.loc[0, "problems"]
    assert (got.loc[1:, "problems"] == "").all() and got["prediction"].notna().all()

    state, meta = load_head(root / "models/sample/text_mlp.safetensors")
    meta["features"]["text"]["weights_hash"] = "0123456789abcdef"
    save_head(tmp_path / "other.safetensors", state, meta)
    with pytest.raises(WeightsMismatch, match=r"text_minilm.*0123456789abcdef.*hashes to [0-9a-f]{16}"):
        load_model(tmp_path / "other.safetensors", work_dir=tmp_path / "w").predict(table)
    out = load_model(tmp_path / "other.safetensors", work_dir=tmp_path / "w", allow_weights_mismatch=True).predict(table)
    assert len(out) == len(table)
    refused = ercflow_cli(root, "predict", "--model", str(tmp_path / "other.safetensors"), "--input",
                          str(root / "data/manifest/sample/meta.json"), check=False)
    assert "ercflow predict:" in refused and "Traceback" not in refused


def test_dvc_repro_refuses_a_flipped_feature_store_and_keeps_dvc_lock(project):
    """64 flipped bytes in a feature store: `dvc repro` fails naming the store (extract verifies the old store
    before it calls it up to date), and dvc.lock keeps the good hash; `dvc checkout` brings the good store back
    and the next `dvc repro` finds it up to date."""
    root, _ = project
    store = root / "data/features/sample/text_minilm.h5"
    lock_before = (root / "dvc.lock").read_text()
    flip_middle(store)
    try:
        r = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=ENV, capture_output=True, text=True)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out[-3000:]
        assert re.search(re.escape("data/features/sample/text_minilm.h5") + r".*damaged store", out), out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert (root / "dvc.lock").read_text() == lock_before       # the damaged file's hash is not recorded
    finally:   # the good store back from the cache; the failed stage's summary (DVC removed it) written again
        dvc(root, "checkout", "-f", "data/features/sample/text_minilm.h5")
        dvc(root, "repro")
    assert json.loads(dvc(root, "status", "--json")) == {}


def test_training_again_gives_the_same_model(project):
    """`trainer.seed` fixes the head's initial weights as well as the batch order (last: it re-runs stages)."""
    root, _ = project
    out = root / "results/sample/text_mlp"
    before = json.loads((out / "metrics.json").read_text())
    predictions = (out / "predictions_test.csv").read_text()
    dvc(root, "repro", "-f", "-s", "train@sample-text_mlp")
    after = json.loads((out / "metrics.json").read_text())
    before.pop("seconds_per_epoch"), after.pop("seconds_per_epoch")
    assert after == before
    assert (out / "predictions_test.csv").read_text() == predictions


def test_dvc_exp_run_and_show(project):
    """An experiment is one command: `dvc exp run -S <params key>=<value>`; `dvc exp show` lists it with the
    compact metrics (reports/metrics.json). It leaves the workspace at the experiment; git and DVC bring it back."""
    root, _ = project
    dvc(root, "exp", "run", "-n", "hidden64", "-S", "heads.text_mlp.options.hidden=64")
    shown = dvc(root, "exp", "show", "--json")
    assert "hidden64" in shown and "text_mlp" in shown and "test_wf1" in shown
    diff = json.loads(dvc(root, "exp", "diff", "--json"))
    assert "heads.text_mlp.options.hidden" in json.dumps(diff["params"])
    sh(root, "git", "checkout", "--", "params.yaml", "dvc.lock")
    dvc(root, "checkout", "-f")
    # the experiment's uncached outputs (text_mlp's metrics, predictions, runs) cannot be checked out: a repro
    # writes them again, and the project is as clean as before the experiment
    ran = set(re.findall(r"Running stage '([^']+)'", dvc(root, "repro")))
    assert {s for s in ran if s.startswith("train@")} == {"train@sample-text_mlp"}, ran
    assert json.loads(dvc(root, "status", "--json")) == {}


def test_a_train_stage_reruns_only_for_the_stores_its_head_reads(project):
    """A new encoder retrains no head; a re-extracted visual store retrains the heads that read it only;
    the report lists the heads params trains now; a head fed by an unlisted teacher stops `dvc repro` first.
    Last in this module: it leaves the project's stores and heads as its edits made them (a re-run to undo them
    would retrain four heads; test_editing_a_head_param_invalidates_only_that_head checks that undoing an edit
    brings the status back to clean)."""
    root, _ = project
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    try:
        params["encoders"]["text_minilm_64"] = {**params["encoders"]["text_minilm"], "max_length": 64}
        params["extract"].append("text_minilm_64")
        params["encoders"]["visual_c3d"]["seed"] = 1
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        ran = set(re.findall(r"Running stage '([^']+)'", dvc(root, "repro")))
        trained = {s for s in ran if s.startswith("train@")}
        assert trained == {"train@sample-fusion_mlp", "train@sample-dialoguetrm", "train@sample-telme",
                           "train@sample-matav"}, ran
        assert {"extract@sample-text_minilm_64", "extract@sample-visual_c3d"} <= ran
        params["train"].remove("text_mlp")
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        dvc(root, "repro")
        reported = json.loads((root / "reports/metrics.json").read_text())["sample"]
        assert "text_mlp" not in reported and "fusion_mlp" in reported
        assert set(reported["fusion_mlp"]) >= {"dev_wf1", "dev_wf1_std", "test_wf1", "test_wf1_std", "seeds"}
        params["heads"]["telme_text"]["features"] = {"text": "teacher_other"}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = dvc(root, "repro", check=False)
        assert "heads.telme_text.features.text" in out and "teachers" in out, out
        assert set(re.findall(r"Running stage '([^']+)'", out)) == {"check"}
    finally:
        (root / "params.yaml").write_text(original)
