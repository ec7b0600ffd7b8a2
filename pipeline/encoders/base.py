"""The encoder registry (`ENCODERS`), `register` and the base classes `Encoder` / `HFEncoder` (the driver
that runs one: pipeline/extract.py; how models run: pipeline/runtime.py; building one from params:
pipeline/encoders/__init__.py).

Each encoder declares its modality, the input it needs (`manifest` for text, `media` for audio/visual)
and its output dimension, and turns a slice of manifest rows into `pooled` [n, D] features, a `valid`
mask, optional `seq` (ragged frame/token features) and per-utterance problems.

An encoder class is registered under the kind its `Config` is registered under (pipeline/configs.py's
`ENCODER_CONFIGS`, which the params schema reads), and takes its `kind` and `modality` from there: the kinds
are written once.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any, ClassVar

import pandas as pd

from pipeline.configs import ENCODER_CONFIGS, RUN_ONLY
from pipeline.manifest import Manifest
from pipeline.onnx_runtime import ONNX_COMPUTE, OnnxModel
from pipeline.registry import Registry
from pipeline.runtime import (compute_precision, quantize_linear_int8, resolve_device, resolve_weights,
                              safetensors_only, weights_hash)
from pipeline.store import MediaStore, fingerprint
from pipeline.vocab import ParamsError

ENCODERS: Registry[type["Encoder"]] = Registry("encoder kind")


def register(cls):
    """Register encoder class `cls` under its `Config`'s kind, from which it takes `kind` and `modality`."""
    config = cls.Config
    kind = getattr(config, "registry_name", None)
    if kind not in ENCODER_CONFIGS or ENCODER_CONFIGS[kind] is not config:
        raise TypeError(f"{cls.__name__}.Config ({config.__name__}) is not registered in ENCODER_CONFIGS "
                        "(pipeline/configs.py): register it there under its kind")
    cls.kind, cls.modality = kind, config.modality
    return ENCODERS.register(kind)(cls)


class Encoder(ABC):
    kind: ClassVar[str]
    modality: ClassVar[str]            # text | audio | visual
    needs_media: ClassVar[bool]
    Config: ClassVar[type]             # a dataclass of this encoder's params

    def __init__(self, name: str, config):
        self.name, self.config = name, config

    @property
    @abstractmethod
    def dim(self) -> int: ...

    def provenance(self) -> dict[str, Any]:
        """Attributes written into the store (weights id and hash, sampling, dtype, ...)."""
        config = {k: v for k, v in asdict(self.config).items() if k not in RUN_ONLY}   # procs: how, not what
        return {"encoder": self.name, "encoder_kind": self.kind, "modality": self.modality,
                "config": config, "config_hash": fingerprint(config), "dtype": "float32"}

    def manifest_provenance(self, manifest: Manifest) -> dict[str, Any]:
        """Attributes that depend on the manifest's metadata (e.g. the labels a store's `logits` score); {}."""
        return {}

    @abstractmethod
    def encode(self, rows: pd.DataFrame, manifest: Manifest, media: MediaStore | None):
        """Features of `rows`: (arrays with `pooled`, `valid` [, `seq`, `seq_lengths`], problems)."""


class HFEncoder(Encoder):
    """An encoder around a transformers model loaded from `config.weights` (hub id, local dir or
    `package:<module>/<dir>`) at `config.revision`, placed on `config.device` in eval mode; with
    `runtime: onnx` run by ONNX Runtime on a CPU instead (pipeline/onnx_runtime.py; `compute` onnx-fp32)."""

    def load_model(self, model_class: str = "AutoModel", processor_class: str | None = None) -> None:
        import transformers

        path = resolve_weights(self.config.weights)
        revision = getattr(self.config, "revision", None)
        if processor_class:
            self.processor = getattr(transformers, processor_class).from_pretrained(path, revision=revision)
        # ONNX export needs eager attention (SDPA's mask code traces to the example's shapes)
        extra = {"attn_implementation": "eager"} if self.runtime == "onnx" else {}
        self.place(getattr(transformers, model_class).from_pretrained(path, revision=revision, **extra,
                                                                       **safetensors_only(path)))

    @property
    def runtime(self) -> str:
        """What runs the model: `torch`, or `onnx` (ONNX Runtime on a CPU: pipeline/onnx_runtime.py)."""
        return getattr(self.config, "runtime", "torch")

    def runtime_compute(self, compute: str) -> str:
        """The store's `compute` given torch's (`compute_precision`) and `runtime`: `onnx-fp32` for ONNX Runtime,
        which runs float32 on a CPU only and not with `quantize: int8` (ParamsError naming the keys)."""
        if self.runtime == "torch":
            return compute
        where = f"encoders.{self.name}"
        if self.runtime != "onnx":
            raise ParamsError(f"{where}.runtime: torch | onnx, not {self.runtime!r}")
        if self.device.type != "cpu":
            raise ParamsError(f"{where}.runtime: onnx runs the model with ONNX Runtime on a CPU, but "
                              f"{where}.device is {self.device.type}: use runtime: torch there")
        quantize = getattr(self.config, "quantize", "none")
        if quantize != "none":
            raise ParamsError(f"{where}.runtime: onnx does not go with {where}.quantize: {quantize} (ONNX Runtime "
                              f"runs float32; int8 is torch's): set one of them back (runtime: torch | quantize: none)")
        return ONNX_COMPUTE

    def place(self, model) -> None:
        self.model = model
        self.device = resolve_device(self.config.device)
        self.compute = self.runtime_compute(compute_precision(
            self.device, getattr(self.config, "autocast", "none"), getattr(self.config, "quantize", "none"),
            f"encoders.{self.name}"))
        if getattr(self.model, "hf_quantizer", None) is None:   # bitsandbytes weights were placed by from_pretrained
            self.model.to(self.device)
        self.model.eval()
        self.int8_layers = quantize_linear_int8(self.model) if self.compute == "int8-dynamic" else []
        if self.compute == ONNX_COMPUTE:   # exported on the first call (pipeline/onnx_runtime.py)
            revision = getattr(self.config, "revision", None)
            self.model = OnnxModel(self.model, {"weights": self.config.weights, "revision": revision or getattr(
                self.model.config, "_commit_hash", None)}, resolve_weights(self.config.weights))

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def provenance(self) -> dict[str, Any]:
        revision = getattr(self.config, "revision", None)
        prov = super().provenance()
        if self.runtime == "torch":   # left out, as stores built before the option were (same fingerprints)
            config = {k: v for k, v in prov["config"].items() if k != "runtime"}
            prov = {**prov, "config": config, "config_hash": fingerprint(config)}
        return {**prov, "weights": self.config.weights,
                "weights_revision": revision or getattr(self.model.config, "_commit_hash", None),
                "weights_hash": weights_hash(resolve_weights(self.config.weights)),
                "model_type": self.model.config.model_type, "compute": self.runtime_compute(self.compute),
                "int8_layers": len(self.int8_layers)}
