import numpy as np
import pytest

from pipeline.encoders import build_encoder
from pipeline.extract import extract
from pipeline.store import FeatureStore, MediaStore
from conftest import save_tiny_timesformer


@pytest.fixture(scope="module")
def tiny_timesformer(tmp_path_factory):
    return save_tiny_timesformer(tmp_path_factory.mktemp("timesformer"))


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    """A ResNet-101-shaped classifier (bottleneck blocks, 1000-way head), tiny widths, random init."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    d = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                              layer_type="bottleneck", num_labels=1000)).save_pretrained(d)
    return str(d)


def test_timesformer_store(tiny_timesformer, sample_manifest, sample_media, tmp_path):
    cfg = {"kind": "hf_video", "weights": tiny_timesformer, "device": "cpu", "batch_size": 3}
    extract(sample_manifest, build_encoder("v", cfg), tmp_path / "a.h5", sample_media, chunk_size=10)
    extract(sample_manifest, build_encoder("v", {**cfg, "batch_size": 1}), tmp_path / "b.h5", sample_media)
    with FeatureStore(tmp_path / "a.h5") as a, FeatureStore(tmp_path / "b.h5") as b:
        x = a.pooled()
        assert x.shape == (len(sample_manifest), 32) and np.isfinite(x).all() and a.valid().all()
        assert a.utt_ids == sample_manifest.utt_ids
        np.testing.assert_allclose(x, b.pooled(), atol=1e-5)
        assert a.attrs["frames_used"] == 3 and a.attrs["model_type"] == "timesformer"
        assert x.std(0).max() > 0


def test_visextnet_full_frame(tiny_resnet, sample_manifest, sample_media, tmp_path):
    cfg = {"kind": "visextnet", "weights": tiny_resnet, "detector": "full", "face_size": 32, "device": "cpu"}
    summary = extract(sample_manifest, build_encoder("f", cfg), tmp_path / "f.h5", sample_media)
    assert summary["problems"] == []
    with FeatureStore(tmp_path / "f.h5") as s, MediaStore(sample_media) as media:
        x = s.pooled()
        assert x.shape == (len(sample_manifest), 1000) and s.valid().all()
        enc = build_encoder("f", cfg)
        u = s.utt_ids[2]   # the mean over frames of the CNN's 1000-way output
        np.testing.assert_allclose(x[2], enc.cnn(list(media.frames(u))).mean(0), atol=1e-4)


def test_visextnet_haar_reports_faceless_frames(tiny_resnet, sample_manifest, sample_media, tmp_path):
    enc = build_encoder("f", {"kind": "visextnet", "weights": tiny_resnet, "detector": "haar", "face_size": 32,
                              "min_face": 8, "device": "cpu"})
    assert enc.face(np.zeros((64, 64, 3), np.uint8)) is None
    summary = extract(sample_manifest, enc, tmp_path / "f.h5", sample_media)
    with FeatureStore(tmp_path / "f.h5") as s:
        masked = {q["utt_id"] for q in summary["problems"] if q["action"] == "masked"}
        assert masked == {u for u, ok in zip(s.utt_ids, s.valid()) if not ok}
        assert all(q["problem"].startswith(("no face found in", "no face in")) for q in summary["problems"])
        assert not s.pooled(sorted(masked)).any()


def test_timesformer_prep_in_dataloader_workers(tiny_timesformer, sample_manifest, sample_media, tmp_path):
    """Frames read and processed in 2 worker processes (each with its own HDF5 handle) give the same store."""
    cfg = {"kind": "hf_video", "weights": tiny_timesformer, "device": "cpu", "batch_size": 4}
    extract(sample_manifest, build_encoder("v", {**cfg, "prep_workers": 0}), tmp_path / "a.h5", sample_media)
    extract(sample_manifest, build_encoder("v", {**cfg, "prep_workers": 2}), tmp_path / "b.h5", sample_media)
    with FeatureStore(tmp_path / "a.h5") as a, FeatureStore(tmp_path / "b.h5") as b:
        np.testing.assert_array_equal(a.pooled(), b.pooled())


def test_cnn3d_loads_a_state_dict_and_runs_it_on_the_stored_frames(sample_manifest, sample_media, tmp_path):
    import torch

    from pipeline.runtime import weights_hash
    from pipeline.encoders.visual import C3D

    torch.manual_seed(123)
    net = C3D(width=4, out_dim=8).eval()
    torch.save(net.state_dict(), tmp_path / "c3d.pt")
    cfg = {"kind": "cnn3d", "weights": str(tmp_path / "c3d.pt"), "width": 4, "out_dim": 8, "frames": 4,
           "device": "cpu", "batch_size": 5}
    extract(sample_manifest, build_encoder("v", cfg), tmp_path / "a.h5", sample_media)
    with FeatureStore(tmp_path / "a.h5") as a, MediaStore(sample_media) as media:
        assert a.attrs["weights"] == str(tmp_path / "c3d.pt")
        assert a.attrs["weights_hash"] == weights_hash(str(tmp_path / "c3d.pt")) and a.attrs["frames_used"] == 4
        u = a.utt_ids[2]
        clip = torch.from_numpy(media.frames(u)).permute(3, 0, 1, 2)[None].float() / 255.0   # the store holds 4
        with torch.no_grad():
            np.testing.assert_allclose(a.pooled([u])[0], net(clip)[0].numpy(), atol=1e-5)
    extract(sample_manifest, build_encoder("v", {**cfg, "frames": 16}), tmp_path / "b.h5", sample_media)
    with FeatureStore(tmp_path / "a.h5") as a, FeatureStore(tmp_path / "b.h5") as b:
        assert b.pooled().shape == a.pooled().shape and not np.allclose(a.pooled(), b.pooled())
    with pytest.raises(ValueError, match="c3d.pt is not a state_dict of C3D"):
        build_encoder("v", {**cfg, "width": 8})
