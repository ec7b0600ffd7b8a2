"""Encoders: `build_encoder(name, raw params)` picks the class registered under `kind` (pipeline/encoders/base.py
holds the registry and base classes; audio.py, text.py and visual.py the encoders) and parses its config.
"""
from __future__ import annotations

from typing import Any

from pipeline.encoders.base import ENCODERS, Encoder, HFEncoder, register  # noqa: F401  (the package's face)
from pipeline.params import from_dict
from pipeline.vocab import ParamsError


def encoder_config(name: str, raw: dict[str, Any]) -> tuple[type[Encoder], Any]:
    """The encoder class and parsed config of `encoders.<name>` (its `kind` picks the class); no model loaded."""
    from pipeline.encoders import audio, text, visual  # noqa: F401  (fill the registry)

    raw = dict(raw)
    kind = raw.pop("kind", None)
    modality = raw.pop("modality", None)
    if kind not in ENCODERS:
        raise ParamsError(f"encoders.{name}.kind: unknown encoder kind {kind!r}; known: {ENCODERS.names()}")
    cls = ENCODERS[kind]
    if modality not in (None, cls.modality):
        raise ParamsError(f"encoders.{name}: kind {kind} is a {cls.modality} encoder, not {modality}")
    return cls, from_dict(cls.Config, raw, f"encoders.{name}")


def build_encoder(name: str, raw: dict[str, Any]) -> Encoder:
    cls, config = encoder_config(name, raw)
    return cls(name, config)
