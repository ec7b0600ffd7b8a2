"""`runtime: onnx` — the transformers encoders run by ONNX Runtime on a CPU (pipeline/onnx_runtime.py)."""
import dataclasses
import json
from copy import copy
from typing import Any

import numpy as np
import pytest

import pipeline.onnx_runtime as onnx_runtime
from pipeline.encoders import build_encoder
from pipeline.extract import extract, extract_inputs, run_fingerprint
from pipeline.params import ParamsError
from pipeline.store import FeatureStore, MediaStore
from conftest import save_tiny_speech_model
from conftest import save_tiny_timesformer

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(autouse=True)
def exports(tmp_path, monkeypatch) -> list:
    """A fresh graph cache per test; the list of exports made (the exporter, counted)."""
    monkeypatch.setenv("ERCFLOW_ONNX_CACHE", str(tmp_path / "onnx-cache"))
    made, real = [], onnx_runtime.export_graph

    def counted(model, example, hidden_states, path):
        made.append((type(model).__name__, sorted(example), hidden_states))
        return real(model, example, hidden_states, path)

    monkeypatch.setattr(onnx_runtime, "export_graph", counted)
    return made


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def provenance_before_the_option(enc) -> dict[str, Any]:
    """The provenance `enc` gives with a config class that has no `runtime` field (as before the option)."""
    fields = [f for f in dataclasses.fields(enc.config) if f.name != "runtime"]
    Old = dataclasses.make_dataclass(type(enc.config).__name__, [(f.name, Any) for f in fields])
    old = copy(enc)
    old.config = Old(**{f.name: getattr(enc.config, f.name) for f in fields})
    return old.provenance()


def torch_and_onnx_stores(manifest, cfg, tmp_path, media=None, name="e"):
    """Extract the torch store and the onnx store of `cfg`; checks what every kind shares; the two stores."""
    enc = build_encoder(name, cfg)
    extract(manifest, enc, tmp_path / "torch.h5", media)
    onnx_enc = build_encoder(name, {**cfg, "runtime": "onnx"})
    assert isinstance(onnx_enc.model, onnx_runtime.OnnxModel)
    extract(manifest, onnx_enc, tmp_path / "onnx.h5", media)
    media_store = MediaStore(media) if media else None
    try:
        inputs = extract_inputs(manifest, enc.needs_media, media_store)
    finally:
        if media_store is not None:
            media_store.close()
    with FeatureStore(tmp_path / "torch.h5") as t, FeatureStore(tmp_path / "onnx.h5") as o:
        assert t.attrs["compute"] == "float32" and o.attrs["compute"] == "onnx-fp32"
        assert o.attrs["fingerprint"] != t.attrs["fingerprint"]
        # runtime: torch leaves the store's fingerprint as it was before the option existed
        assert "runtime" not in enc.provenance()["config"]
        assert t.attrs["fingerprint"] == run_fingerprint(provenance_before_the_option(enc), inputs)
        assert o.attrs["config"]["runtime"] == "onnx"
        x, y = t.pooled(), o.pooled()
        assert x.shape == y.shape and y.dtype == np.float32 and (t.valid() == o.valid()).all()
        assert t.valid().any() and cosines(x, y)[t.valid()].min() >= 0.9999
        assert np.abs(x - y).max() < 1e-3
    return enc, onnx_enc


@pytest.mark.parametrize("fmt, pooling", [("utterance", "mean"), ("prompt", "mask")])
def test_text_store_matches_torch(tiny_bert, sample_manifest, tmp_path, exports, fmt, pooling):
    cfg = {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "input_format": fmt, "pooling": pooling,
           "batch_size": 8}
    _, onnx_enc = torch_and_onnx_stores(sample_manifest, cfg, tmp_path)
    assert exports == [("BertModel", ["attention_mask", "input_ids", "token_type_ids"], False)]
    assert onnx_enc.model.config._attn_implementation == "eager"   # SDPA does not export with dynamic shapes
    if fmt == "prompt":   # the speaker tokens were added before the export: the graph has the resized embeddings
        assert onnx_enc.model.config.vocab_size == len(onnx_enc.tokenizer)


def test_graph_is_exported_once_and_a_tampered_one_again(tiny_bert, sample_manifest, tmp_path, exports):
    cfg = {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "pooling": "mean", "batch_size": 8,
           "runtime": "onnx"}
    extract(sample_manifest, build_encoder("t", cfg), tmp_path / "a.h5")
    assert len(exports) == 1
    extract(sample_manifest, build_encoder("t", cfg), tmp_path / "b.h5")   # a second build: the cached graph
    assert len(exports) == 1
    folders = [p for p in (tmp_path / "onnx-cache").iterdir()]
    assert len(folders) == 1 and not folders[0].name.startswith(".")
    graph, sidecar = folders[0] / "model.onnx", json.loads((folders[0] / "graph.json").read_text())
    assert sidecar["files"]["model.onnx"] == onnx_runtime.file_sha256(graph)
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF   # a flipped byte inside the weights: still a graph ONNX Runtime would load
    graph.write_bytes(bytes(data))
    extract(sample_manifest, build_encoder("t", cfg), tmp_path / "c.h5")
    assert len(exports) == 2 and onnx_runtime.verified(folders[0])
    assert [p.name for p in (tmp_path / "onnx-cache").iterdir()] == [folders[0].name]   # no temp folders left
    with FeatureStore(tmp_path / "a.h5") as a, FeatureStore(tmp_path / "c.h5") as c:
        assert np.array_equal(a.pooled(), c.pooled())


def test_hidden_states_are_exported_when_layers_are_kept(tiny_bert, sample_manifest, tmp_path, exports):
    cfg = {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "pooling": "cls", "batch_size": 8,
           "layers": "all"}
    torch_and_onnx_stores(sample_manifest, cfg, tmp_path)
    assert [e[2] for e in exports] == [True]
    with FeatureStore(tmp_path / "onnx.h5") as o:
        assert o.pooled().shape[1:] == (3, 32)   # embeddings + 2 layers


def test_audio_store_matches_torch(sample_manifest, sample_media, tmp_path, exports):
    from pipeline.manifest import Manifest

    weights = save_tiny_speech_model(tmp_path / "wavlm", "wavlm")
    # batches of 2 clips of different lengths: padding, the attention mask, another length on every call
    # (10 clips cut at 1.5 s: torch runs the sample's full clips slowly)
    manifest = Manifest(sample_manifest.rows.head(10).reset_index(drop=True), sample_manifest.meta)
    cfg = {"kind": "hf_audio", "weights": weights, "device": "cpu", "batch_size": 2, "max_seconds": 1.5}
    torch_and_onnx_stores(manifest, cfg, tmp_path, sample_media)
    assert exports == [("WavLMModel", ["attention_mask", "input_values"], False)]


def test_video_store_matches_torch(sample_manifest, sample_media, tmp_path, exports):
    cfg = {"kind": "hf_video", "weights": save_tiny_timesformer(tmp_path / "tf"), "device": "cpu", "batch_size": 4,
           "pooling": "mean"}
    torch_and_onnx_stores(sample_manifest, cfg, tmp_path, sample_media)
    assert exports == [("TimesformerModel", ["pixel_values"], False)]


def test_planned_provenance_is_the_encoders_own(tiny_bert):
    from pipeline.inspect import planned_provenance

    for runtime in ("torch", "onnx"):
        cfg = {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "pooling": "mean", "runtime": runtime}
        planned, real = planned_provenance("t", cfg), build_encoder("t", cfg).provenance()
        assert json.dumps(planned, sort_keys=True, default=str) == json.dumps(real, sort_keys=True, default=str)
        assert real["compute"] == ("onnx-fp32" if runtime == "onnx" else "float32")


def test_onnx_only_on_a_cpu_and_not_with_int8(tiny_bert):
    cfg = {"kind": "hf_text", "weights": tiny_bert, "runtime": "onnx"}
    with pytest.raises(ParamsError, match=r"encoders\.t\.runtime.*cuda"):
        build_encoder("t", {**cfg, "device": "cuda"})
    with pytest.raises(ParamsError, match=r"encoders\.t\.runtime.*encoders\.t\.quantize"):
        build_encoder("t", {**cfg, "device": "cpu", "quantize": "int8"})
    with pytest.raises(ParamsError, match=r"encoders\.t\.runtime"):
        build_encoder("t", {**cfg, "device": "cpu", "runtime": "tensorrt"})


def test_predict_on_a_gpu_keeps_an_onnx_encoder_on_the_cpu(tiny_bert):
    """A bundle whose store ONNX Runtime computed, predicted with --device cuda: that encoder is rebuilt on the
    CPU with ONNX Runtime (the features the head was trained on), not refused for the device."""
    from types import SimpleNamespace

    from ercflow.model import Model

    trained = build_encoder("t", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "pooling": "mean",
                                  "runtime": "onnx"})
    recipe = trained.provenance()
    for device in ("cuda", "auto", "cpu"):
        model = SimpleNamespace(path="models/x/h.safetensors", device_name=device, allow_weights_mismatch=False)
        enc = Model.encoder(model, "text", recipe, None)
        assert enc.device.type == "cpu" and enc.provenance()["compute"] == "onnx-fp32"
        assert enc.provenance()["config_hash"] == recipe["config_hash"]
