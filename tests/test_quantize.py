"""`quantize: int8` — dynamic int8 Linear layers for CPU extraction."""
import numpy as np
import pytest
import torch

from pipeline.encoders import build_encoder
from pipeline.extract import extract
from pipeline.runtime import compute_precision, quantize_linear_int8
from pipeline.params import ParamsError
from pipeline.store import FeatureStore
from conftest import save_tiny_speech_model
from conftest import save_tiny_timesformer


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_int8_close_to_fp32(a_path, b_path):
    with FeatureStore(a_path) as fp32, FeatureStore(b_path) as int8:
        assert fp32.attrs["compute"] == "float32" and fp32.attrs["int8_layers"] == 0
        assert int8.attrs["compute"] == "int8-dynamic" and int8.attrs["int8_layers"] > 0
        assert int8.attrs["fingerprint"] != fp32.attrs["fingerprint"]
        x, y = fp32.pooled(), int8.pooled()
        assert y.dtype == np.float32 and np.isfinite(y).all() and (fp32.valid() == int8.valid()).all()
        assert not np.allclose(x, y, atol=1e-6)           # the int8 path really ran
        assert cosines(x, y)[fp32.valid()].min() > 0.98   # and stays close to float32


def test_int8_text_store(tiny_bert, sample_manifest, tmp_path):
    cfg = {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "pooling": "mean"}
    extract(sample_manifest, build_encoder("t", cfg), tmp_path / "fp32.h5")
    extract(sample_manifest, build_encoder("t", {**cfg, "quantize": "int8"}), tmp_path / "int8.h5")
    assert_int8_close_to_fp32(tmp_path / "fp32.h5", tmp_path / "int8.h5")
    extract(sample_manifest, build_encoder("t", {**cfg, "quantize": "int8", "batch_size": 3}), tmp_path / "again.h5")
    with FeatureStore(tmp_path / "int8.h5") as a, FeatureStore(tmp_path / "again.h5") as b:
        # activations are quantized per batch, so batching moves features a little, but not far
        assert cosines(a.pooled(), b.pooled()).min() > 0.99


def test_int8_wavlm_keeps_its_attention_projections_float(sample_manifest, sample_media, tmp_path):
    weights = save_tiny_speech_model(tmp_path / "wavlm", "wavlm")
    cfg = {"kind": "hf_audio", "weights": weights, "device": "cpu", "batch_size": 1}
    extract(sample_manifest, build_encoder("a", cfg), tmp_path / "fp32.h5", sample_media)
    enc = build_encoder("a", {**cfg, "quantize": "int8"})
    # WavLM's attention hands q/k/v/out_proj weights to F.multi_head_attention_forward itself
    assert enc.int8_layers and not any(n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) for n in enc.int8_layers)
    assert any(n.endswith("feed_forward.intermediate_dense") for n in enc.int8_layers)
    extract(sample_manifest, enc, tmp_path / "int8.h5", sample_media)
    assert_int8_close_to_fp32(tmp_path / "fp32.h5", tmp_path / "int8.h5")


def test_int8_timesformer(sample_manifest, sample_media, tmp_path):
    cfg = {"kind": "hf_video", "weights": save_tiny_timesformer(tmp_path / "tf"), "device": "cpu", "batch_size": 4}
    extract(sample_manifest, build_encoder("v", cfg), tmp_path / "fp32.h5", sample_media)
    extract(sample_manifest, build_encoder("v", {**cfg, "quantize": "int8"}), tmp_path / "int8.h5", sample_media)
    assert_int8_close_to_fp32(tmp_path / "fp32.h5", tmp_path / "int8.h5")


class ReadsItsWeights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.ff = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.ff(torch.nn.functional.linear(x, self.proj.weight, self.proj.bias))


def test_layers_whose_weights_are_read_directly_stay_float():
    torch.manual_seed(0)
    model = torch.nn.Sequential(ReadsItsWeights(), torch.nn.Linear(8, 4))
    x = torch.randn(5, 8)
    ref = model(x)
    assert quantize_linear_int8(model) == ["0.ff", "1"]
    assert isinstance(model[0].proj, torch.nn.Linear) and not isinstance(model[0].ff, torch.nn.Linear)
    out = model(x)
    assert out.shape == ref.shape and torch.nn.functional.cosine_similarity(out, ref).min() > 0.98


def test_compute_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_precision(cpu, "bf16", "int8", "e") == "int8-dynamic"
    assert compute_precision(cpu, "bf16", "none", "e") == "float32"        # autocast is a CUDA option
    assert compute_precision(cuda, "bf16", "int8", "e") == "bf16-autocast"  # quantize is a CPU option
    assert compute_precision(cuda, "none", "none", "e") == "float32"
    with pytest.raises(ParamsError, match="e.quantize"):
        compute_precision(cpu, "bf16", "int4", "e")
    with pytest.raises(ParamsError, match="e.autocast"):
        compute_precision(cpu, "fp8", "none", "e")
