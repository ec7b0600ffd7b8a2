"""`ercflow inspect`: store rows, staleness against params.yaml without loading a model, problems, JSON,
damaged files. Builds a tiny project (manifest, media store, opensmile / cnn3d / hf_text / teacher stores) in
a temp dir the way the stages lay it out, and calls the command module directly (not through cli.py)."""
import argparse
import copy
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import h5py
import pytest
import yaml

from ercflow import inspect as cmd
from pipeline.inspect import planned_provenance, planned_teacher_provenance

REPO = Path(__file__).resolve().parents[1]
DECODE = dict(frames=4, size=32, chunk_size=8)


def encoders(tiny_bert):
    return {"smile": {"kind": "opensmile", "min_seconds": 1.8, "workers": 0},   # masks the shorter clips
            "c3d": {"kind": "cnn3d", "width": 4, "out_dim": 8, "frames": 4, "device": "cpu"},
            "tiny_text": {"kind": "hf_text", "weights": tiny_bert, "pooling": "mean", "max_length": 32,
                          "device": "cpu"}}


def teacher_params(tiny_bert):
    return {"weights": tiny_bert, "input_format": "indi_context", "pooling": "cls", "context_window": 3,
            "max_length": 48, "epochs": 1, "device": "cpu"}


def write_params(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def project(tmp_path_factory, sample_manifest, tiny_bert):
    """data/{manifest,media,features}/sample + models/sample/teacher + params.yaml, built by the library."""
    from pipeline.encoders import build_encoder
    from pipeline.extract import extract
    from pipeline.configs import TextFinetuneParams
    from pipeline.finetune.kinds import TextFinetuner
    from pipeline.finetune.store_writer import write_store
    from pipeline.manifest import Manifest
    from pipeline.media import decode_dataset
    from pipeline.params import DecodeParams, from_dict

    root = tmp_path_factory.mktemp("project")
    data = root / "data"
    sample_manifest.save(data / "manifest/sample")
    manifest = Manifest.load(data / "manifest/sample")   # what the stages read
    decode = DecodeParams(**DECODE)
    decode_dataset(manifest, data / "media/sample.h5", decode)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["sample"]["root"] = manifest.meta.root
    raw["decode"] = asdict(decode)
    raw["encoders"].update(encoders(tiny_bert))
    raw["finetune"]["teacher"] = teacher_params(tiny_bert)
    params = write_params(root / "params.yaml", raw)
    for name, cfg in encoders(tiny_bert).items():
        extract(manifest, build_encoder(name, cfg), data / f"features/sample/{name}.h5", data / "media/sample.h5")
    tuner = TextFinetuner(manifest, from_dict(TextFinetuneParams, teacher_params(tiny_bert), "finetune.teacher"),
                          root / "models/sample/teacher")
    tuner.save("best")   # no training needed: the store's provenance is what is checked
    write_store(tuner, "teacher", data / "features/sample/teacher.h5")
    return {"root": root, "data": data, "params": params, "raw": raw, "manifest": manifest}


def inspect(*paths, params=None, problems=False, as_json=False) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    argv = [str(p) for p in paths] + (["--params", str(params)] if params else []) \
        + (["--problems"] if problems else []) + (["--json"] if as_json else [])
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cmd.run(parser.parse_args(argv))
    return rc, out.getvalue()


def rows(*paths, params=None, problems=False) -> dict[str, dict]:
    rc, out = inspect(*paths, params=params, problems=problems, as_json=True)
    assert rc == 0, out
    return {Path(r["path"]).name: r for r in json.loads(out)["stores"]}


def test_fresh_stores_are_not_stale(project):
    got = rows(project["data"], params=project["params"])
    assert set(got) == {"sample.h5", "smile.h5", "c3d.h5", "tiny_text.h5", "teacher.h5"}
    for name, r in got.items():
        assert r["status"] == "fresh" and r["stale"] is False, (name, r["reasons"])
    assert got["c3d.h5"]["dim"] == 8 and got["tiny_text.h5"]["dim"] == 32 and got["smile.h5"]["dim"] == 88
    assert got["tiny_text.h5"]["compute"] == "float32" and len(got["tiny_text.h5"]["weights_hash"]) == 16
    assert got["teacher.h5"]["kind"] == "finetuned_text" and got["teacher.h5"]["details"]["logits"]
    n = len(project["manifest"])
    assert all(r["rows"] == n for r in got.values())
    # the plain table: one aligned row per store, stale column "no"
    rc, out = inspect(project["data"], params=project["params"])
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:3] == ["store", "encoder", "kind"]
    table = lines[1:6]
    assert [line.split()[-2] for line in table] == ["no"] * 5, out
    assert len({line.index(" no ") for line in table}) == 1   # columns aligned


def test_edited_params_make_exactly_those_stores_stale(project, tmp_path):
    raw = copy.deepcopy(project["raw"])
    raw["encoders"]["c3d"]["out_dim"] = 6
    raw["encoders"]["tiny_text"]["max_length"] = 16
    del raw["encoders"]["smile"]
    raw["finetune"]["teacher"]["lr"] = 1e-4
    got = rows(project["data"], params=write_params(tmp_path / "edited.yaml", raw))
    assert got["sample.h5"]["status"] == "fresh"
    assert got["c3d.h5"]["stale"] is True and got["c3d.h5"]["reasons"] == ["config.out_dim: 8 -> 6"]
    assert got["tiny_text.h5"]["reasons"] == ["config.max_length: 32 -> 16"]
    assert got["smile.h5"]["status"] == "not in params" and got["smile.h5"]["stale"] is None
    assert got["teacher.h5"]["reasons"] == ["config.lr: 6e-06 -> 0.0001"]
    rc, out = inspect(project["data"], params=tmp_path / "edited.yaml")
    assert "config.out_dim: 8 -> 6" in out and "not in params" in out


def test_a_decode_edit_makes_the_media_store_and_its_feature_stores_stale(project, tmp_path):
    raw = copy.deepcopy(project["raw"])
    raw["decode"]["size"] = 24
    got = rows(project["data"], params=write_params(tmp_path / "edited.yaml", raw))
    assert got["sample.h5"]["reasons"] == ["decode.size: 32 -> 24"]
    for name in ("smile.h5", "c3d.h5"):   # read the media store: stale through it
        assert got[name]["stale"] is True and "media store" in got[name]["reasons"][0], got[name]
        assert "decode.size: 32 -> 24" in got[name]["reasons"][0]
    assert got["tiny_text.h5"]["status"] == got["teacher.h5"]["status"] == "fresh"   # read only the manifest


def test_changed_weights_make_the_store_stale(project, tmp_path, tiny_bert):
    weights = tmp_path / "bert"
    shutil.copytree(tiny_bert, weights)
    raw = copy.deepcopy(project["raw"])
    raw["encoders"]["tiny_text"]["weights"] = str(weights)
    params = write_params(tmp_path / "moved.yaml", raw)
    store = project["data"] / "features/sample/tiny_text.h5"
    assert rows(store, params=params)["tiny_text.h5"]["reasons"] == [f"config.weights: {tiny_bert} -> {weights}"]
    (weights / "extra.txt").write_text("changed")   # same id, other content: the hash tells
    reasons = rows(store, params=params)["tiny_text.h5"]["reasons"]
    assert any(r.startswith("weights_hash: ") for r in reasons), reasons


def test_problems_lists_masked_utterances_with_reasons(project):
    from pipeline.store import FeatureStore

    with FeatureStore(project["data"] / "features/sample/smile.h5") as s:
        recorded, valid = s.problems(), s.valid()
    assert recorded and len(recorded) == int((~valid).sum())
    rc, out = inspect(project["data"] / "features/sample/smile.h5", params=project["params"], problems=True)
    assert rc == 0 and f"{len(recorded)} problem(s), {len(recorded)} masked" in out
    for q in recorded:
        line = next(x for x in out.splitlines() if x.strip().startswith(q["utt_id"] + " "))
        assert "audio" in line and "masked" in line and "audio shorter than 1.8 s" in line
    got = rows(project["data"] / "features/sample/smile.h5", params=project["params"], problems=True)["smile.h5"]
    assert got["problem_list"] == recorded and got["problems"] == got["masked"] == len(recorded)
    assert got["valid"] == pytest.approx(float(valid.mean()))


def test_json_fields(project):
    rc, out = inspect(project["data"] / "media/sample.h5", project["data"] / "features/sample/c3d.h5",
                      params=project["params"], as_json=True)
    doc = json.loads(out)
    assert rc == 0 and doc["params"] == project["params"] and doc["params_error"] is None
    media, c3d = doc["stores"]
    for r in (media, c3d):
        assert {"path", "status", "stale", "reasons", "kind", "encoder", "dataset", "weights", "weights_hash", "dim",
                "rows", "valid", "valid_by_modality", "compute", "problems", "masked"} <= set(r)
        assert "problem_list" not in r
    assert c3d["encoder"] == "c3d" and c3d["kind"] == "cnn3d" and c3d["weights"] == "random-init(seed=0)"
    assert c3d["weights_hash"] is None and c3d["dataset"] == "sample"


def test_media_store_row(project):
    got = rows(project["data"] / "media/sample.h5", params=project["params"])["sample.h5"]
    assert got["kind"] == "media" and got["status"] == "fresh" and got["rows"] == len(project["manifest"])
    assert set(got["valid_by_modality"]) == {"audio", "video"} and got["valid"] == 1.0
    assert got["details"]["frames"] == 4 and got["details"]["frame_size"] == 32
    rc, out = inspect(project["data"] / "media/sample.h5", params=project["params"])
    assert "media" in out.splitlines()[1] and "32px" in out


def test_damaged_and_foreign_files_are_error_rows(project, tmp_path):
    good = project["data"] / "features/sample/c3d.h5"
    (tmp_path / "truncated.h5").write_bytes(good.read_bytes()[:3000])
    (tmp_path / "notes.h5").write_text("not hdf5 at all\n")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1, 2, 3]
    got = rows(tmp_path, params=project["params"])
    assert set(got) == {"truncated.h5", "notes.h5", "foreign.h5"}
    assert all(r["status"] == "error" and r["stale"] is None for r in got.values())
    assert "not a readable HDF5 file" in got["truncated.h5"]["reasons"][0]
    assert "not a readable HDF5 file" in got["notes.h5"]["reasons"][0]
    assert "not an ercflow store" in got["foreign.h5"]["reasons"][0]
    rc, out = inspect(tmp_path, good, params=project["params"])
    assert rc == 0 and "Traceback" not in out
    for name in ("truncated.h5", "notes.h5", "foreign.h5"):
        assert any(name in line and " error " in line for line in out.splitlines()), out
        assert any(line.endswith(f"{name}: error") for line in out.splitlines()), out


def test_a_missing_path_is_status_2_and_the_rest_still_shows(project, tmp_path):
    rc, out = inspect(tmp_path / "nope.h5", project["data"] / "features/sample/c3d.h5", params=project["params"])
    assert rc == 2 and "c3d" in out
    rc, _ = inspect(project["data"] / "media/sample.h5", params=tmp_path / "missing.yaml")
    assert rc == 2


def test_default_is_every_store_under_data_and_an_interrupted_run_is_a_row(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project["root"])
    got = rows()   # no PATH, params.yaml of the current folder
    assert set(got) == {"sample.h5", "smile.h5", "c3d.h5", "tiny_text.h5", "teacher.h5"}
    assert all(r["status"] == "fresh" for r in got.values())
    partial = tmp_path / "data/features/sample/ghost.h5.partial"
    partial.mkdir(parents=True)
    (partial / "chunk_000000.npz").write_bytes(b"")
    got = rows(tmp_path / "data", params=project["params"])
    assert got["ghost.h5"]["status"] == "partial" and "1 finished chunk" in got["ghost.h5"]["reasons"][0]


def test_without_params_rows_still_show(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no params.yaml here
    rc, out = inspect(project["data"] / "features/sample/c3d.h5")
    assert rc == 0 and "staleness not checked" in out and out.splitlines()[1].split()[-2] == "?"


def test_planned_provenance_is_the_encoders_own(project, tiny_bert):
    """The model-free provenance equals what the loaded encoder reports (so a fresh store stays fresh)."""
    from pipeline.encoders import build_encoder
    from pipeline.configs import TextFinetuneParams
    from pipeline.finetune.kinds import TextFinetuner
    from pipeline.finetune.store_writer import FinetunedTextEncoder
    from pipeline.params import from_dict

    for name, cfg in encoders(tiny_bert).items():
        assert json.dumps(planned_provenance(name, cfg), sort_keys=True, default=str) == \
            json.dumps(build_encoder(name, cfg).provenance(), sort_keys=True, default=str), name
    p = from_dict(TextFinetuneParams, teacher_params(tiny_bert), "finetune.teacher")
    ckpt = project["root"] / "models/sample/teacher"
    real = FinetunedTextEncoder("teacher", TextFinetuner(project["manifest"], p, ckpt), ckpt / "best").provenance()
    planned = planned_teacher_provenance("teacher", teacher_params(tiny_bert), str(ckpt / "best"),
                                         project["manifest"].meta.labels)
    assert json.dumps(planned, sort_keys=True, default=str) == json.dumps(real, sort_keys=True, default=str)


def test_a_teacher_whose_checkpoint_is_gone_is_stale(project):
    best = project["root"] / "models/sample/teacher/best"
    moved = best.with_name("best.moved")
    best.rename(moved)
    try:
        got = rows(project["data"] / "features/sample/teacher.h5", params=project["params"])["teacher.h5"]
    finally:
        moved.rename(best)
    assert got["stale"] is True and any("is missing" in r for r in got["reasons"]), got["reasons"]


def test_int8_store_fresh_and_stale_on_precision(project, tmp_path, tiny_bert):
    """`quantize: int8` records how many layers went int8; that count comes from the store (it needs the model)."""
    from pipeline.encoders import build_encoder
    from pipeline.extract import extract

    shutil.copytree(project["data"] / "manifest", tmp_path / "data/manifest")
    cfg = {**encoders(tiny_bert)["tiny_text"], "quantize": "int8"}
    extract(project["manifest"], build_encoder("tiny_int8", cfg), tmp_path / "data/features/sample/tiny_int8.h5")
    raw = copy.deepcopy(project["raw"])
    raw["encoders"]["tiny_int8"] = cfg
    got = rows(tmp_path / "data", params=write_params(tmp_path / "p.yaml", raw))["tiny_int8.h5"]
    assert got["status"] == "fresh" and got["compute"] == "int8-dynamic", got["reasons"]
    raw["encoders"]["tiny_int8"] = {**cfg, "quantize": "none"}
    got = rows(tmp_path / "data", params=write_params(tmp_path / "p.yaml", raw))["tiny_int8.h5"]
    assert "config.quantize: int8 -> none" in got["reasons"] and "compute: int8-dynamic -> float32" in got["reasons"]


def test_planned_provenance_of_the_other_transformers_kinds(tmp_path):
    """hf_audio (sample rate from the processor; int8 layer count), hf_video (num_frames), visextnet."""
    from conftest import save_tiny_speech_model
    from conftest import save_tiny_timesformer
    from transformers import ResNetConfig, ResNetForImageClassification

    from pipeline.encoders import build_encoder

    speech = save_tiny_speech_model(tmp_path / "wavlm", "wavlm")
    video = save_tiny_timesformer(tmp_path / "timesformer")
    resnet = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="bottleneck",
                          num_labels=10)
    ResNetForImageClassification(resnet).save_pretrained(tmp_path / "resnet")
    for cfg in ({"kind": "hf_audio", "weights": speech, "device": "cpu"},
                {"kind": "hf_audio", "weights": speech, "device": "cpu", "quantize": "int8"},
                {"kind": "hf_video", "weights": video, "device": "cpu"},
                {"kind": "visextnet", "weights": str(tmp_path / "resnet"), "device": "cpu", "detector": "full"}):
        real = build_encoder("x", cfg).provenance()
        planned = planned_provenance("x", cfg, stored=real)   # stored: only its int8 layer count is read
        assert json.dumps(planned, sort_keys=True, default=str) == json.dumps(real, sort_keys=True, default=str), cfg
