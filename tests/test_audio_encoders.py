import numpy as np
import pytest

from pipeline.encoders import build_encoder
from pipeline.extract import extract
from pipeline.store import FeatureStore
from conftest import save_tiny_speech_model


@pytest.mark.parametrize("model_type", ["wavlm", "data2vec-audio"])
def test_hf_audio_store(model_type, sample_manifest, sample_media, tmp_path):
    weights = save_tiny_speech_model(tmp_path / model_type, model_type)
    cfg = {"kind": "hf_audio", "weights": weights, "device": "cpu", "batch_size": 4, "return_sequence": True}
    extract(sample_manifest, build_encoder("a", cfg), tmp_path / "a.h5", sample_media, chunk_size=10)
    extract(sample_manifest, build_encoder("a", {**cfg, "batch_size": 1}), tmp_path / "b.h5", sample_media)
    with FeatureStore(tmp_path / "a.h5") as a, FeatureStore(tmp_path / "b.h5") as b:
        assert a.utt_ids == sample_manifest.utt_ids
        x = a.pooled()
        assert x.shape == (len(sample_manifest), 32) and np.isfinite(x).all() and a.valid().all()
        # padding in a batch changes nothing, up to data2vec-audio's stacked positional convolutions, which
        # (in transformers' implementation) let the zeroed padding leak a little into the last real frames
        np.testing.assert_allclose(x, b.pooled(), atol=2e-4 if model_type == "wavlm" else 1e-2)
    from pipeline.store import MediaStore

    with MediaStore(sample_media) as media, FeatureStore(tmp_path / "a.h5") as a:
        for u in a.utt_ids[:3]:   # the tiny conv stack has a total stride of 20 samples per frame
            assert a.sequence(u).shape == (len(media.audio(u)) // 20 - 1, 32)
        assert a.attrs["sample_rate"] == 16000 and a.attrs["model_type"] == model_type
        assert a.attrs["weights"] == weights and a.attrs["weights_hash"]


def test_hf_audio_refuses_a_wrong_rate(sample_manifest, sample_media, tmp_path):
    from transformers import Wav2Vec2FeatureExtractor

    weights = save_tiny_speech_model(tmp_path / "w", "wavlm")
    Wav2Vec2FeatureExtractor(sampling_rate=8000, return_attention_mask=True).save_pretrained(weights)
    with pytest.raises(ValueError, match="expects 8000 Hz audio, the media store holds 16000 Hz"):
        extract(sample_manifest, build_encoder("a", {"kind": "hf_audio", "weights": weights, "device": "cpu"}),
                tmp_path / "a.h5", sample_media)


def test_hf_audio_prep_in_dataloader_workers(sample_manifest, sample_media, tmp_path):
    weights = save_tiny_speech_model(tmp_path / "w", "wavlm")
    cfg = {"kind": "hf_audio", "weights": weights, "device": "cpu", "batch_size": 4}
    extract(sample_manifest, build_encoder("a", {**cfg, "prep_workers": 0}), tmp_path / "a.h5", sample_media)
    extract(sample_manifest, build_encoder("a", {**cfg, "prep_workers": 2}), tmp_path / "b.h5", sample_media)
    with FeatureStore(tmp_path / "a.h5") as a, FeatureStore(tmp_path / "b.h5") as b:
        np.testing.assert_array_equal(a.pooled(), b.pooled())


@pytest.mark.parametrize("workers", [0, 2])
def test_opensmile_masks_bad_and_short_audio(workers, tmp_path):
    from pipeline.media import decode_dataset
    from pipeline.params import DecodeParams
    from conftest import bad_media_manifest

    m = bad_media_manifest(tmp_path)
    decode_dataset(m, tmp_path / "media.h5", DecodeParams(frames=2, size=16, max_clip_seconds=4.0))
    enc = build_encoder("s", {"kind": "opensmile", "min_seconds": 1.5, "workers": workers})
    summary = extract(m, enc, tmp_path / "s.h5", tmp_path / "media.h5", chunk_size=3)
    assert {q["utt_id"]: q["problem"] for q in summary["problems"]} == {
        "corrupt": "audio masked at decode", "missing": "audio masked at decode", "notrack": "audio masked at decode",
        "part1": "audio shorter than 1.5 s", "part2": "audio shorter than 1.5 s"}
    assert all(q["action"] == "masked" and q["modality"] == "audio" for q in summary["problems"])
    with FeatureStore(tmp_path / "s.h5") as s:
        valid = dict(zip(s.utt_ids, s.valid()))
        assert [u for u, ok in valid.items() if ok] == ["good", "long"]
        x = dict(zip(s.utt_ids, s.pooled()))
        assert not x["part1"].any() and not x["corrupt"].any() and x["good"].any()
        assert not np.allclose(x["good"], x["long"])


def test_silent_audio_is_masked_by_both_audio_encoders(tmp_path):
    import pandas as pd

    from pipeline.datasets.sample import write_mp4
    from pipeline.manifest import Manifest, ManifestMeta
    from pipeline.media import decode_dataset
    from pipeline.params import DecodeParams

    frames = np.full((12, 32, 32, 3), 90, np.uint8)
    t = np.arange(16000) / 16000
    clips = {"tone": (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), "silent": np.zeros(16000, np.float32),
             "quiet": (0.003 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)}   # -53 dBFS: kept
    for u, x in clips.items():
        write_mp4(tmp_path / f"{u}.mp4", frames, 12, x, 16000)
    df = pd.DataFrame([{"utt_id": u, "dataset": "t", "split": "train", "dialogue_id": "d", "turn": i, "speaker": "A",
                        "text": "x", "label": "a", "video": f"{u}.mp4", "audio": f"{u}.mp4"} for i, u in enumerate(clips)])
    m = Manifest(df, ManifestMeta(dataset="t", root=str(tmp_path), labels=["a"]))
    decode_dataset(m, tmp_path / "media.h5", DecodeParams(frames=2, size=16))
    weights = save_tiny_speech_model(tmp_path / "wavlm", "wavlm")
    for cfg in ({"kind": "opensmile", "workers": 0}, {"kind": "hf_audio", "weights": weights, "device": "cpu"}):
        summary = extract(m, build_encoder("a", cfg), tmp_path / f"{cfg['kind']}.h5", tmp_path / "media.h5")
        assert [(q["utt_id"], q["problem"].split(" (")[0]) for q in summary["problems"]] == [("silent", "silent audio")]
        with FeatureStore(tmp_path / f"{cfg['kind']}.h5") as s:
            assert s.valid().tolist() == [True, False, True] and not s.pooled(["silent"]).any()
