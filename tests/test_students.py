"""Fine-tuned audio and video encoders (TelME's students, and any encoder fine-tuned once then cached): the `ce`
fine-tune's store beats the frozen store, TelME's student loss is eq. 6 built from heads/telme.py's losses, an
interrupted audio fine-tune resumes exactly, the video student runs end to end, and `dvc status` ties the
students to their teacher's store. Tiny random-init data2vec-audio / TimeSformer saved to a temp dir."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from heads.telme import PAPER_DEFAULTS, dist_loss, feature_kd_loss
from heads.telme_students import TelmeStudent, student_loss, telme_weights
from pipeline.configs import AudioFinetuneParams, FinetuneBase, VideoFinetuneParams
from pipeline.encoders import Encoder, build_encoder
from pipeline.extract import extract
from pipeline.finetune.checkpoint import CheckpointError
from pipeline.finetune.kinds import AudioFinetuner, VideoFinetuner, build_finetuner
from pipeline.finetune.loop import InterruptTraining
from pipeline.finetune.store_writer import write_store
from pipeline.store import FeatureStore
from conftest import save_coarse_data2vec, save_tiny_timesformer


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A sample whose audio carries the emotion cue in 90% of utterances: short clips, 32-px frames."""
    from pipeline.datasets import build_manifest
    from pipeline.datasets.sample import generate
    from pipeline.media import decode_dataset
    from pipeline.params import DatasetParams, DecodeParams, SampleParams

    d = tmp_path_factory.mktemp("students")
    generate(d / "raw", SampleParams(dialogues=24, min_turns=4, max_turns=6, min_seconds=0.4, max_seconds=0.8,
                                     p_audio=0.9, fps=8, size=32, seed=2))
    manifest, problems = build_manifest("sample", DatasetParams(adapter="sample", root=str(d / "raw")))
    assert problems == []
    decode_dataset(manifest, d / "media.h5", DecodeParams(frames=4, size=32, chunk_size=64))
    return d, manifest, d / "media.h5"


@pytest.fixture(scope="module")
def d2v(tmp_path_factory):
    return save_coarse_data2vec(tmp_path_factory.mktemp("d2v"))


class FakeTeacher(Encoder):
    """A teacher store stand-in: seeded 16-d features and logits per utterance (as stage finetune_text writes)."""
    kind, modality, needs_media, Config = "finetuned_text", "text", False, dict

    def __init__(self, labels):
        super().__init__("teacher", {"seed": 0})
        self.labels = labels

    dim = 16

    def provenance(self):
        return {"encoder": self.name, "encoder_kind": self.kind, "modality": "text", "labels": self.labels}

    def encode(self, rows, manifest, media=None):
        rng = np.random.default_rng(len(rows))
        y = manifest.label_index()[rows.index.to_numpy()]
        logits = rng.normal(size=(len(rows), len(self.labels))).astype(np.float32)
        logits[np.arange(len(rows)), np.maximum(y, 0)] += 2.0   # a teacher that is mostly right
        valid = np.ones(len(rows), bool)
        valid[:1] = False   # one utterance the teacher masks (empty text): CE only there
        return {"pooled": rng.normal(size=(len(rows), 16)).astype(np.float32), "logits": logits,
                "valid": valid}, []


@pytest.fixture(scope="module")
def teacher_store(data):
    d, manifest, _ = data
    extract(manifest, FakeTeacher(manifest.meta.labels), d / "teacher.h5", chunk_size=1000)
    return d / "teacher.h5"


def audio_params(weights, **kw) -> AudioFinetuneParams:
    base = dict(kind="hf_audio", weights=weights, device="cpu", lr=1e-2, warmup_steps=2, epochs=3, batch_size=4,
                patience=100, dropout=0.0, save_every_steps=0, eval_batch_size=16)
    return AudioFinetuneParams(**{**base, **kw})


def linear_probe_dev_wf1(store, manifest) -> float:
    """Dev WF1 of a logistic regression fitted on a store's train features (standardised)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    with FeatureStore(store) as s:
        x = s.pooled(manifest.utt_ids)
    y, split = manifest.label_index(), manifest.rows["split"].to_numpy()
    mu, sd = x[split == "train"].mean(0), x[split == "train"].std(0) + 1e-6
    x = (x - mu) / sd
    clf = LogisticRegression(max_iter=3000).fit(x[split == "train"], y[split == "train"])
    return f1_score(y[split == "dev"], clf.predict(x[split == "dev"]), average="weighted")


def test_audio_ce_finetune_beats_the_frozen_store(data, d2v, tmp_path):
    d, manifest, media = data
    frozen = tmp_path / "frozen.h5"
    extract(manifest, build_encoder("a", {"kind": "hf_audio", "weights": d2v, "device": "cpu", "batch_size": 16}),
            frozen, media)
    p = audio_params(d2v)
    tuner = build_finetuner(manifest, p, tmp_path / "ckpt", media)
    assert isinstance(tuner, AudioFinetuner) and tuner.model.projection is None   # ce: no teacher to match
    state = tuner.train(log=lambda *_: None)
    losses = [h["train_loss"] for h in state["history"]]
    assert losses[-1] < losses[0], losses
    summary = write_store(tuner, "audio_ft", tmp_path / "ft.h5", chunk_size=40)
    assert summary["utterances"] == len(manifest)
    before, after = linear_probe_dev_wf1(frozen, manifest), linear_probe_dev_wf1(tmp_path / "ft.h5", manifest)
    assert after > before + 0.05, (before, after)   # measured: 0.65 frozen, 0.75 fine-tuned
    with FeatureStore(tmp_path / "ft.h5") as s, FeatureStore(frozen) as f:
        assert s.utt_ids == manifest.utt_ids and s.logits().shape == (len(manifest), len(manifest.meta.labels))
        np.testing.assert_array_equal(s.valid(), f.valid())   # the hf_audio encoder's masking, kept
        a = s.attrs
        assert a["encoder_kind"] == "finetuned_audio" and a["modality"] == "audio" and a["objective"] == "ce"
        assert a["config"]["kind"] == "hf_audio" and a["config"]["lr"] == p.lr and a["config"]["epochs"] == 3
        assert a["config_hash"] and a["weights"].endswith("best") and len(a["weights_hash"]) == 16
        assert a["base_weights"] == d2v and a["base_weights_hash"] == f.attrs["weights_hash"]
    # the best checkpoint: safetensors + JSON, the encoder with its feature extractor (usable as hf_audio weights)
    files = {str(f.relative_to(tmp_path / "ckpt")) for f in (tmp_path / "ckpt").rglob("*") if f.is_file()}
    assert {"best/encoder/model.safetensors", "best/encoder/preprocessor_config.json", "best/classifier.safetensors",
            "last/training_state.safetensors"} <= files
    assert json.loads((tmp_path / "ckpt/best/checkpoint.json").read_text())["format"] == "ercflow.audio_checkpoint"


def test_telme_student_loss_is_eq6_from_heads_telme():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    f_s, f_t = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    got = student_loss(z_s, f_s, y, z_t, f_t, alpha=0.1, beta=1.0, tau_response=4.0, tau_feature=1.0)
    want = F.cross_entropy(z_s, y) + 0.1 * dist_loss(z_s, z_t, 4.0) + 1.0 * feature_kd_loss(f_s, f_t, 1.0)
    torch.testing.assert_close(got, want)
    # alpha = beta = 0: exactly ce
    none = student_loss(z_s, f_s, y, z_t, f_t, alpha=0.0, beta=0.0, tau_response=4.0, tau_feature=1.0)
    assert torch.equal(none, F.cross_entropy(z_s, y))
    # rows the teacher masks take part in CE only
    keep = torch.tensor([True, True, False, True, True, False])
    got = student_loss(z_s, f_s, y, z_t, f_t, 1.0, 1.0, 2.0, 1.0, teacher_valid=keep)
    want = F.cross_entropy(z_s, y) + dist_loss(z_s[keep], z_t[keep], 2.0) + feature_kd_loss(f_s[keep], f_t[keep], 1.0)
    torch.testing.assert_close(got, want)
    # Table 9 presets, from heads/telme.py; explicit values win
    base = dict(weights="w")
    assert telme_weights(FinetuneBase(**base, paper_defaults="iemocap")) == {
        k: PAPER_DEFAULTS["iemocap"][k] for k in ("alpha", "beta", "tau_response", "tau_feature")}
    assert telme_weights(FinetuneBase(**base, paper_defaults="meld", beta=0.5))["beta"] == 0.5
    import typing

    hint = typing.get_type_hints(FinetuneBase)["paper_defaults"]
    assert set(typing.get_args(typing.get_args(hint)[0])) == set(PAPER_DEFAULTS)


def test_kd_gradients_reach_the_encoder_and_zero_weights_are_ce(data, d2v, teacher_store, tmp_path):
    d, manifest, media = data
    p = audio_params(d2v, objective="telme_student", paper_defaults="meld")
    student = TelmeStudent(teacher_store, manifest, p)
    tuner = build_finetuner(manifest, p, tmp_path / "ckpt", media, student)
    assert tuner.model.projection is not None and tuner.model.classifier.in_features == 16   # to the teacher's size
    rows = tuner.rows["train"][:6]
    y = torch.from_numpy(manifest.label_index()[rows])
    tuner.model.train()
    pooled, logits = tuner.model(tuner.collate(rows))
    kd = student.loss(rows, pooled, logits, y, None) - F.cross_entropy(logits, y)   # the KD terms alone
    assert kd.item() > 0
    kd.backward()
    grads = {n: w.grad for n, w in tuner.model.encoder.named_parameters() if w.grad is not None}
    assert grads and any(g.abs().sum() > 0 for n, g in grads.items() if "encoder.layers.0" in n), sorted(grads)[:5]
    zero = TelmeStudent(teacher_store, manifest, audio_params(d2v, objective="telme_student", alpha=0, beta=0))
    assert torch.equal(zero.loss(rows, pooled, logits, y, None), F.cross_entropy(logits, y))
    # the teacher enters the student's identity: another teacher store, another fine-tune
    assert student.identity()["teacher_fingerprint"] == FeatureStore(teacher_store).attrs["fingerprint"]
    assert tuner.fingerprint != build_finetuner(manifest, audio_params(d2v), tmp_path / "ckpt", media).fingerprint


def test_interrupted_audio_finetune_resumes_exactly(data, d2v, tmp_path):
    _, manifest, media = data
    kw = dict(epochs=1, batch_size=8, save_every_steps=2, dropout=0.1)   # the RNG states must come back too
    ref = AudioFinetuner(manifest, audio_params(d2v, **kw), tmp_path / "ref", media).train(log=lambda *_: None)
    tuner = AudioFinetuner(manifest, audio_params(d2v, **kw), tmp_path / "ckpt", media)
    assert tuner.p.group_by_length   # audio batches are grouped by length
    with pytest.raises(InterruptTraining):
        tuner.train(log=lambda *_: None, stop_after_steps=3)
    logs = []
    resumed = AudioFinetuner(manifest, audio_params(d2v, **kw), tmp_path / "ckpt", media).train(log=logs.append)
    assert any(line.startswith("resuming from") and "step 3" in line for line in logs), logs
    assert resumed["step"] == ref["step"]
    assert [h["dev_wf1"] for h in resumed["history"]] == [h["dev_wf1"] for h in ref["history"]]
    for f in ("encoder/model.safetensors", "classifier.safetensors", "training_state.safetensors"):
        a, b = load_file(tmp_path / "ref/last" / f), load_file(tmp_path / "ckpt/last" / f)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
    # a checkpoint of another kind is refused, naming both
    meta = tmp_path / "ckpt/last/checkpoint.json"
    meta.write_text(meta.read_text().replace("ercflow.audio_checkpoint", "ercflow.video_checkpoint"))
    with pytest.raises(CheckpointError, match="a checkpoint of another kind.*'ercflow.video_checkpoint'.*hf_audio"):
        tuner.resumable()


def test_video_student_end_to_end(data, teacher_store, tmp_path):
    d, manifest, media = data
    weights = save_tiny_timesformer(tmp_path / "tsf")
    p = VideoFinetuneParams(kind="hf_video", weights=weights, device="cpu", objective="telme_student",
                            paper_defaults="iemocap", lr=1e-3, warmup_steps=1, epochs=2, batch_size=8, patience=5,
                            save_every_steps=0)
    tuner = build_finetuner(manifest, p, tmp_path / "ckpt", media, TelmeStudent(teacher_store, manifest, p))
    assert isinstance(tuner, VideoFinetuner) and tuner.num_frames == 3
    state = tuner.train(log=lambda *_: None)
    assert state["step"] > 0 and len(state["history"]) == 2
    write_store(tuner, "visual_student", tmp_path / "v.h5")
    with FeatureStore(tmp_path / "v.h5") as s, FeatureStore(teacher_store) as t:
        assert s.utt_ids == manifest.utt_ids and s.dim == 16 and np.isfinite(s.pooled()).all()
        a = s.attrs
        assert a["encoder_kind"] == "finetuned_video" and a["modality"] == "visual"
        assert a["objective"] == "telme_student" and a["teacher_fingerprint"] == t.attrs["fingerprint"]
        assert a["telme"] == {k: PAPER_DEFAULTS["iemocap"][k] for k in ("alpha", "beta", "tau_response", "tau_feature")}
        assert a["config"]["paper_defaults"] == "iemocap" and a["base_weights"] == weights
    assert (tmp_path / "ckpt/best/projection.safetensors").exists()


# -- params and the DVC graph ------------------------------------------------------------------------

STUDENTS = {"audio_student": {"kind": "hf_audio", "weights": "facebook/data2vec-audio-base-960h",
                              "objective": "telme_student", "paper_defaults": "meld"}}


def params_with_students(root, **extra):
    import yaml

    from conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["finetune"].update(STUDENTS)
    params["distil"] = {"teacher": "teacher_minilm", "students": ["audio_student"]}
    params["heads"]["telme"]["features"] = {"text": "teacher_minilm", "audio": "audio_student"}
    params.update(extra)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def test_params_of_students(tmp_path):
    from ercflow.check import check_params
    from pipeline.params import load_params

    params_with_students(tmp_path)
    assert check_params(tmp_path / "params.yaml") == []
    loaded = load_params(tmp_path / "params.yaml")
    assert isinstance(loaded.finetune_entry("audio_student"), AudioFinetuneParams)
    assert loaded.store_modality("audio_student") == "audio" and loaded.store_modality("teacher_minilm") == "text"
    cases = [({"teachers": ["teacher_minilm", "audio_student"], "distil": {"teacher": "teacher_minilm", "students": []}},
              "teachers[1]: 'audio_student' is a hf_audio fine-tune: list it in distil.students"),
             ({"distil": {"students": ["audio_student"]}}, "distil.teacher: missing"),
             ({"distil": {"teacher": "text_minilm", "students": ["audio_student"]}},
              "distil.teacher: 'text_minilm' is not a fine-tuned teacher"),
             ({"distil": {"teacher": "teacher_minilm", "students": []}},
              "finetune.audio_student.objective: telme_student distils distil.teacher's store"),
             ({"finetune": {"audio_student": {**STUDENTS["audio_student"], "pooling": "cls"}}},
              "finetune.audio_student: unknown key 'pooling'"),
             ({"finetune": {"audio_student": {**STUDENTS["audio_student"], "kind": "hf_wav"}}},
              "finetune.audio_student.kind: unknown kind 'hf_wav'")]
    for edit, message in cases:
        params_with_students(tmp_path, **edit)
        problems = check_params(tmp_path / "params.yaml")
        assert any(message in q for q in problems), (message, problems)
    params_with_students(tmp_path)
    raw = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(raw.replace("audio: audio_student", "visual: audio_student"))
    assert any("'audio_student' is an audio fine-tune (finetune, hf_audio), not visual" in q
               for q in check_params(tmp_path / "params.yaml"))


def test_a_teacher_rerun_marks_its_students_and_the_telme_head_stale(tmp_path, monkeypatch):
    """`dvc status` on a project whose stages' outputs are stand-ins (committed, not run): a new teacher store
    makes the student stage and the `inputs` stages stale (they read stores), nothing else; once the student and
    the inputs ran again, the heads that read the teacher or the student are stale, the others not."""
    import shutil

    from conftest import REPO
    from conftest import ENV, project_files

    root = tmp_path / "proj"
    for f in project_files():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, root / f)
    params_with_students(root, datasets=["toy"], samples=[], extract=["text_minilm"], teachers=["teacher_minilm"],
                         train=["text_mlp", "telme"],
                         data={"toy": {"adapter": "generic", "manifest": "data/raw/toy/toy.csv"}})
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["heads"]["telme"]["modalities"] = ["text", "audio"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def run(*cmd):
        out = subprocess.run(list(cmd), cwd=root, env=ENV, capture_output=True, text=True)
        assert out.returncode == 0, " ".join(cmd) + "\n" + out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    def store(name, seed):   # a small feature store, as the stages write them
        path = root / f"data/features/toy/{name}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        from pipeline.store import ChunkedRun, StoreLayout, assemble

        chunks = ChunkedRun(path, f"fp{seed}")
        chunks.save(0, {"pooled": np.full((2, 4), seed, np.float32), "valid": np.ones(2, bool)}, [])
        assemble(chunks, ["u0", "u1"], 1, StoreLayout(fixed=["pooled"], ragged=[]),
                 {"fingerprint": f"{name}-{seed}", "dim": 4})
        path.with_suffix(".summary.json").write_text("{}")

    stand_ins = ["data/params.checked", "data/raw/toy/toy.csv", "data/manifest/toy/manifest.csv",
                 "data/media/toy.h5", "data/media/toy.summary.json", "models/toy/teacher_minilm/best",
                 "models/toy/audio_student/best", "reports/report.md", "reports/report.json", "reports/metrics.json"]
    for head in ("text_mlp", "telme"):
        stand_ins += [f"models/toy/{head}.safetensors", f"data/inputs/toy/{head}.json"] + [
            f"results/toy/{head}/{f}" for f in ("predictions_dev.csv", "metrics.json", "curves.csv", "confusion.png",
                                               "predictions_test.csv", "runs/official-s0/done.json")]
    for f in stand_ins:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(f)
    for name in ("text_minilm", "teacher_minilm", "audio_student"):
        store(name, 0)
    from stages import inputs

    monkeypatch.chdir(root)
    for head in ("text_mlp", "telme"):
        inputs.main(["--dataset", "toy", "--head", head])
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "commit", "-f", "-q")
    assert json.loads(run(sys.executable, "-m", "dvc", "status", "--json")) == {}
    deps = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["finetune_student@toy-audio_student"]["deps"]
    assert "data/features/toy/teacher_minilm.h5" in [d["path"] for d in deps]

    store("teacher_minilm", 1)   # the teacher re-ran (its stage's outputs changed)
    stale = set(json.loads(run(sys.executable, "-m", "dvc", "status", "--json")))
    assert stale == {"finetune_text@toy-teacher_minilm", "finetune_student@toy-audio_student", "inputs@toy-text_mlp",
                     "inputs@toy-telme"}, stale
    run(sys.executable, "-m", "dvc", "commit", "-f", "-q", "finetune_text@toy-teacher_minilm")
    store("audio_student", 1)   # the student re-ran
    run(sys.executable, "-m", "dvc", "commit", "-f", "-q", "finetune_student@toy-audio_student")
    run(sys.executable, "-m", "dvc", "repro", "-s", "inputs@toy-text_mlp", "inputs@toy-telme")
    stale = set(json.loads(run(sys.executable, "-m", "dvc", "status", "--json")))
    assert stale == {"train@toy-telme"}, stale


def test_predict_rebuilds_a_student_from_its_checkpoint(data, d2v, teacher_store, tmp_path, monkeypatch):
    """`load_model(...).predict` on a head over a TelME audio student's store: the student comes back from its
    checkpoint alone (the base weights are gone by then), projection to the teacher's size included, and the
    head's outputs on the test dialogues are the ones training computed from the stored features."""
    import shutil

    from heads.data import CachedDialogues
    from heads.fit import fit_head, save_trained_head
    from pipeline import UserError
    from pipeline.params import HeadParams, TrainerParams
    from ercflow.model import load_model

    d, manifest, media = data
    monkeypatch.chdir(tmp_path)
    base = shutil.copytree(d2v, tmp_path / "base")
    # one clip per forward pass: padding in a batch moves a clip's features a little (data2vec's convolutional
    # position embedding sees it), and the batches of the store and of predict hold different clips
    p = audio_params(str(base), objective="telme_student", paper_defaults="meld", epochs=1, eval_batch_size=1)
    tuner = build_finetuner(manifest, p, "models/toy/audio_student", media, TelmeStudent(teacher_store, manifest, p))
    tuner.train(log=lambda *_: None)
    write_store(tuner, "audio_student", "data/features/toy/audio_student.h5")
    tuner.close()
    stores = {"audio": "data/features/toy/audio_student.h5"}
    cached = CachedDialogues(manifest, stores)
    hp = HeadParams(head="late_fusion", modalities=["audio"], options={"hidden": 16})
    head, result = fit_head(hp, TrainerParams(epochs=2, batch_dialogues=4, device="cpu"), cached,
                            log=lambda *_: None)
    save_trained_head("models/toy/a.safetensors", "a", hp, head, result, cached, stores, str(media))
    shutil.rmtree(base)

    test = manifest.rows[manifest.rows["split"] == "test"]
    table = test[["utt_id", "dialogue_id", "turn", "speaker", "text", "audio", "video"]]
    model = load_model("models/toy/a.safetensors", device="cpu", work_dir=tmp_path / "work")
    got = model.predict(table, media_root=manifest.meta.root)
    assert head.dims["audio"] == 16   # the student's 32-d frames projected to the teacher's 16
    rows, raw = result.predictions["test"]
    want = torch.softmax(torch.from_numpy(raw), -1).numpy()
    order = [list(got["utt_id"]).index(u) for u in manifest.rows.loc[rows, "utt_id"]]
    probs = got[[f"p_{label}" for label in manifest.meta.labels]].to_numpy()[order]
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert (got.loc[order, "prediction"].to_numpy() == np.array(manifest.meta.labels)[want.argmax(1)]).all()

    shutil.rmtree("models/toy/audio_student")
    with pytest.raises(UserError, match=r"models/toy/a.safetensors: its audio input is the fine-tuned audio encoder "
                                        r"'audio_student' \(stage finetune_student\) at models/toy/audio_student/best, "
                                        r"which is not here"):
        load_model("models/toy/a.safetensors", device="cpu", work_dir=tmp_path / "work2").predict(
            table, media_root=manifest.meta.root)
