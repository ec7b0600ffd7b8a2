"""The one place that reads params.yaml.

Every section is a small typed dataclass; unknown keys are an error (a typo in params.yaml should
not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    pass


def from_dict(cls, data: dict[str, Any] | None, where: str):
    """Build dataclass `cls` from `data`, rejecting unknown keys and naming `where` in errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{where}: missing required key '{f.name}'")
            continue
        value = data[f.name]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{f.name}")
        elif hint is float and isinstance(value, (int, str)):
            value = float(value)  # YAML reads 1e-3 as a string
        kwargs[f.name] = value
    return cls(**kwargs)


@dataclass
class SampleParams:
    """The bundled synthetic dataset (pipeline/datasets/sample.py)."""
    seed: int = 0
    dialogues: int = 60
    min_turns: int = 6
    max_turns: int = 14
    min_seconds: float = 1.0
    max_seconds: float = 2.5
    fps: int = 12
    size: int = 64
    sample_rate: int = 16000
    # probability that each modality carries the emotion cue of an utterance
    p_text: float = 0.45
    p_audio: float = 0.55
    p_visual: float = 0.55


@dataclass
class DatasetParams:
    adapter: str                 # sample | meld | iemocap | generic
    root: str                    # dataset root; media paths in the manifest are relative to it
    csv_dir: str | None = None   # MELD: folder of the official *_sent_emo.csv files (default: root)
    manifest: str | None = None  # generic: path of the CSV/JSONL manifest
    dev_fraction: float = 0.1    # IEMOCAP: share of session 1-4 dialogues held out as dev
    seed: int = 0
    labels: list[str] | None = None  # fixed label order; default: the adapter's


@dataclass
class DecodeParams:
    sample_rate: int = 16000
    frames: int = 8              # canonical frames per utterance, uniform over the clip
    size: int = 64               # frames are resized to size x size
    max_clip_seconds: float = 30.0
    long_clip: str = "trim"      # trim | mask: what to do with a clip longer than max_clip_seconds
    on_bad_media: str = "mask"   # mask | fail: corrupt/missing media, no audio track
    chunk_size: int = 64         # utterances per resumable chunk


@dataclass
class TrainerParams:
    batch_dialogues: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    epochs: int = 40
    patience: int = 8            # early stopping on dev weighted F1
    seed: int = 0
    device: str = "auto"
    grad_clip: float = 1.0


@dataclass
class HeadParams:
    head: str                               # registry name in heads/
    task: str = "categorical"               # categorical (softmax over labels) | dimensional (regression)
    modalities: list[str] = field(default_factory=lambda: ["text", "audio", "visual"])
    options: dict[str, Any] = field(default_factory=dict)   # head-specific, checked by the head
    features: dict[str, str] = field(default_factory=dict)  # per-head override of `features` (e.g. a teacher)
    trainer: dict[str, Any] = field(default_factory=dict)   # overrides of the shared trainer params


@dataclass
class Params:
    datasets: list[str]
    extract: list[str]
    train: list[str]
    teachers: list[str]
    sample: SampleParams
    data: dict[str, DatasetParams]
    decode: DecodeParams
    encoders: dict[str, dict[str, Any]]     # parsed by pipeline.encoders.encoder_config
    features: dict[str, str]                # modality -> encoder whose store feeds the heads
    trainer: TrainerParams
    heads: dict[str, HeadParams]
    finetune: dict[str, dict[str, Any]]     # parsed by pipeline.finetune.FinetuneParams

    def head(self, name: str) -> HeadParams:
        if name not in self.heads:
            raise ParamsError(f"heads: no head '{name}'; defined: {sorted(self.heads)}")
        return self.heads[name]

    def trainer_for(self, name: str) -> TrainerParams:
        merged = {**dataclasses.asdict(self.trainer), **self.head(name).trainer}
        return from_dict(TrainerParams, merged, f"heads.{name}.trainer")

    def dataset(self, name: str) -> DatasetParams:
        if name not in self.data:
            raise ParamsError(f"data: no dataset '{name}'; defined: {sorted(self.data)}")
        return self.data[name]


def parse_params(raw: dict[str, Any]) -> Params:
    return Params(
        datasets=list(raw.get("datasets", [])),
        extract=list(raw.get("extract", [])),
        train=list(raw.get("train", [])),
        teachers=list(raw.get("teachers", [])),
        sample=from_dict(SampleParams, raw.get("sample"), "sample"),
        data={k: from_dict(DatasetParams, v, f"data.{k}") for k, v in (raw.get("data") or {}).items()},
        decode=from_dict(DecodeParams, raw.get("decode"), "decode"),
        encoders=dict(raw.get("encoders") or {}),
        features=dict(raw.get("features") or {}),
        trainer=from_dict(TrainerParams, raw.get("trainer"), "trainer"),
        heads={k: from_dict(HeadParams, v, f"heads.{k}") for k, v in (raw.get("heads") or {}).items()},
        finetune=dict(raw.get("finetune") or {}),
    )


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    with open(path, encoding="utf-8") as f:
        return parse_params(yaml.safe_load(f) or {})
