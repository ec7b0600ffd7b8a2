"""Text-only datasets (transcripts, no media) are a first-class case: no root needed, no media problems, a
valid media store without audio or frames, and a complete text feature store."""
import json

import numpy as np
import pandas as pd
import pytest

from pipeline.datasets import build_manifest
from pipeline.datasets.sample import write_mp4
from pipeline.encoders import build_encoder
from pipeline.extract import extract
from pipeline.manifest import Manifest
from pipeline.media import decode_dataset
from pipeline.params import DatasetParams, DecodeParams
from pipeline.store import FeatureStore, MediaStore

CHAT = [("u0", "train", "d0", 0, "Ada", "i am so happy about the cake", "joy"),
        ("u1", "train", "d0", 1, "Ben", "this is not great", "sad"),
        ("u2", "train", "d0", 2, "Ada", "why now", "joy"),
        ("u3", "dev", "d1", 0, "Ben", "tell me more", "sad"),
        ("u4", "test", "d2", 0, "Ada", "okay hmm", "joy")]
COLUMNS = ["utt_id", "split", "dialogue_id", "turn", "speaker", "text", "label"]


def test_chat_log_through_prepare_decode_and_extract(tmp_path, monkeypatch, tiny_bert):
    """A generic CSV without media columns and without a root: stage prepare, stage decode, then a text store."""
    from stages import decode, prepare

    pd.DataFrame(CHAT, columns=COLUMNS).to_csv(tmp_path / "chat.csv", index=False)
    (tmp_path / "params.yaml").write_text("datasets: [chat]\nextract: []\ntrain: []\nteachers: []\n"
                                          "data:\n  chat: {adapter: generic, manifest: chat.csv}\n"
                                          "decode: {frames: 4, size: 32}\n")
    monkeypatch.chdir(tmp_path)
    prepare.main(["--dataset", "chat"])
    assert json.loads((tmp_path / "data/manifest/chat/problems.json").read_text()) == []
    decode.main(["--dataset", "chat"])
    summary = json.loads((tmp_path / "data/media/chat.summary.json").read_text())
    assert summary["text_only"] is True and summary["problems"] == []
    assert summary["masked_audio"] == summary["masked_video"] == 0 and summary["absent_audio"] == 5
    with MediaStore(tmp_path / "data/media/chat.h5") as s:
        assert s.utt_ids == ["u0", "u1", "u2", "u3", "u4"]
        assert not s.fixed("audio_valid").any() and not s.fixed("video_valid").any()
        assert s.file["frames"].shape == (5, 0, 32, 32, 3) and s.file["audio"].shape == (0,)
        assert s.attrs["text_only"] is True and s.attrs["frames"] == 0
        assert len(s.audio("u3")) == 0 and s.problems() == []

    manifest = Manifest.load(tmp_path / "data/manifest/chat")
    assert manifest.meta.root is None
    encoder = build_encoder("text", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu"})
    out = tmp_path / "data/features/chat/text.h5"
    text_summary = extract(manifest, encoder, out, tmp_path / "data/media/chat.h5", chunk_size=2)
    assert text_summary["problems"] == [] and text_summary["masked"] == 0
    with FeatureStore(out) as f:
        assert f.utt_ids == manifest.utt_ids and f.valid().all()
        assert f.pooled().shape == (5, f.dim) and np.isfinite(f.pooled()).all() and np.abs(f.pooled()).sum() > 0


def test_empty_media_values_are_text_only_too(tmp_path):
    df = pd.DataFrame(CHAT, columns=COLUMNS).assign(video="", audio="")
    df.to_csv(tmp_path / "chat.csv", index=False)
    m, problems = build_manifest("chat", DatasetParams(adapter="generic", root=None, manifest=str(tmp_path / "chat.csv")))
    assert problems == []
    summary = decode_dataset(m, tmp_path / "media.h5", DecodeParams(frames=2, size=16))
    assert summary["text_only"] and summary["problems"] == []


def test_media_paths_need_a_root(tmp_path):
    df = pd.DataFrame(CHAT, columns=COLUMNS).assign(video=["", "a.mp4", "", "", ""])
    df.to_csv(tmp_path / "chat.csv", index=False)
    from pipeline.manifest import ManifestError

    with pytest.raises(ManifestError, match=r"row 2 \(utt_id u1\): video path 'a.mp4' needs a dataset root.*"
                                            r"[Ss]et data.chat.root"):
        build_manifest("chat", DatasetParams(adapter="generic", root=None, manifest=str(tmp_path / "chat.csv")))


def test_media_for_some_utterances_only(tmp_path):
    """u0 has a clip, u1 names a clip that is missing, the others have none: u1 is reported once at prepare and
    once per modality masked at decode; the utterances without media are not problems."""
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    write_mp4(tmp_path / "u0.mp4", rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), 12,
              (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    media = ["u0.mp4", "gone.mp4", "", "", ""]
    pd.DataFrame(CHAT, columns=COLUMNS).assign(video=media, audio=media).to_csv(tmp_path / "chat.csv", index=False)
    m, problems = build_manifest("chat", DatasetParams(adapter="generic", root=str(tmp_path),
                                                       manifest=str(tmp_path / "chat.csv")))
    assert [(p.utt_id, p.problem) for p in problems] == [("u1", "video and audio file missing")]
    summary = decode_dataset(m, tmp_path / "media.h5", DecodeParams(frames=2, size=16))
    assert not summary["text_only"] and summary["absent_audio"] == summary["absent_video"] == 3
    assert sorted((q["utt_id"], q["modality"], q["problem"]) for q in summary["problems"]) == [
        ("u1", "audio", "audio file missing"), ("u1", "visual", "video file missing")]
    with MediaStore(tmp_path / "media.h5") as s:
        assert dict(zip(s.utt_ids, s.fixed("audio_valid"))) == {"u0": True, "u1": False, "u2": False, "u3": False,
                                                                 "u4": False}
        assert s.file["frames"].shape == (5, 2, 16, 16, 3) and s.frames("u0").any()


def test_a_text_only_dataset_through_dvc_repro(tmp_path):
    """Real-size chat transcripts (no media, no root) through `dvc repro`: every stage runs, zero media problems."""
    import subprocess
    import sys

    import yaml

    from conftest import REPO
    from conftest import ENV, project_files

    root = tmp_path / "proj"
    for f in project_files():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes((REPO / f).read_bytes())
    rows = [(f"c{d}u{t}", "train" if d < 6 else "dev" if d < 8 else "test", f"c{d}", t, "AB"[t % 2],
             ["i am so happy about the cake", "this is not great", "why now", "tell me more"][(d + t) % 4],
             ["joy", "sad"][(d + t) % 2]) for d in range(10) for t in range(4)]
    (root / "data/raw/chat").mkdir(parents=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(root / "data/raw/chat/chat.csv", index=False)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(datasets=["chat"], samples=[], extract=["text_minilm"], teachers=[], train=["text_mlp"])
    params["data"] = {"chat": {"adapter": "generic", "manifest": "data/raw/chat/chat.csv"}}
    params["trainer"].update(epochs=3, seeds=[0])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"],
                [sys.executable, "-m", "dvc", "repro"]):
        out = subprocess.run(cmd, cwd=root, env=ENV, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for stage in ("prepare@chat", "decode@chat", "extract@chat-text_minilm", "train@chat-text_mlp"):
        assert f"Running stage '{stage}'" in out.stdout + out.stderr
    assert json.loads((root / "data/manifest/chat/problems.json").read_text()) == []
    summary = json.loads((root / "data/media/chat.summary.json").read_text())
    assert summary["text_only"] and summary["problems"] == []
    assert json.loads((root / "data/features/chat/text_minilm.summary.json").read_text())["problems"] == []
    assert "chat" in json.loads((root / "reports/metrics.json").read_text())
