"""The sections of params.yaml as pydantic dataclasses (`extra="forbid"`), and `Params`, the whole file, with
the look-ups the stages use (`head`, `trainer_for`, `encoder`, `finetune_entry`, ...).

`encoders` and `finetune` stay raw mappings here, each entry typed by its `kind` (pipeline/configs.py): the
whole-file schema (schema.py) validates them, and `encoder(name)` / `finetune_entry(name)` build their configs.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Optional

from pydantic import Field
from pydantic.dataclasses import dataclass

from pipeline import paths
from pipeline.configs import DEFAULT_FINETUNE_KIND, ENCODER_CONFIGS, FINETUNE_CONFIGS, store_modality
from pipeline.params.evaluation import (ClaimParams, CrossParams, MetricKey, Protocol, ProtocolParams,
                                       SignificanceParams, resolve_protocol)
from pipeline.params.strict import from_dict
from pipeline.vocab import (FORBID, Device, Modality, Name, NonNegativeFloat, NonNegativeInt, ParamsError,
                            PositiveFloat, PositiveInt, Probability, Seed)


@dataclass(config=FORBID)
class SampleParams:
    """The bundled synthetic dataset (pipeline/datasets/sample.py)."""
    seed: Seed = 0
    dialogues: PositiveInt = 60
    min_turns: PositiveInt = 6
    max_turns: PositiveInt = 14
    min_seconds: PositiveFloat = 1.0
    max_seconds: PositiveFloat = 2.5
    fps: PositiveInt = 12
    size: PositiveInt = 64
    sample_rate: PositiveInt = 16000
    # probability that each modality carries the emotion cue of an utterance
    p_text: Probability = 0.45
    p_audio: Probability = 0.55
    p_visual: Probability = 0.55
    # also write a tiny random-init decoder-only LLM into <sample>/tiny_llm (pipeline/tiny_llm.py): the CPU
    # recipe's LLM teacher (recipes/sample-llm-lora-cpu.yaml); its outputs mean nothing
    tiny_llm: bool = False


@dataclass(config=FORBID)
class DatasetParams:
    adapter: Literal["sample", "meld", "iemocap", "generic"]
    # dataset root; media paths in the manifest are relative to it (needed only when the dataset has media)
    root: Optional[str] = None
    csv_dir: Optional[str] = None    # MELD: folder of the official *_sent_emo.csv files (default: root)
    manifest: Optional[str] = None   # generic: path of the CSV/JSONL manifest
    dev_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1   # IEMOCAP: share of session 1-4 dialogues held out as dev
    seed: Seed = 0
    labels: Optional[Annotated[list[str], Field(min_length=1)]] = None   # fixed label order; default: the adapter's
    allow_outside_root: bool = False  # media paths may leave `root` (a trusted, hand-written manifest)
    # evaluation protocol (pipeline/protocols.py): official | iemocap4_loso | iemocap6_loso, or a mapping
    protocol: Protocol = "official"


@dataclass(config=FORBID)
class DecodeParams:
    sample_rate: PositiveInt = 16000
    frames: PositiveInt = 8          # canonical frames per utterance, uniform over the clip
    size: PositiveInt = 64           # frames are resized to size x size
    max_clip_seconds: PositiveFloat = 30.0
    long_clip: Literal["trim", "mask"] = "trim"       # a clip longer than max_clip_seconds
    on_bad_media: Literal["mask", "fail"] = "mask"    # corrupt/missing media, no audio track
    chunk_size: PositiveInt = 64     # utterances per resumable chunk
    reader: Literal["auto", "decord", "pyav"] = "auto"   # auto: decord when importable, else PyAV


@dataclass(config=FORBID)
class TrainerParams:
    batch_dialogues: PositiveInt = 8
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.01
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    epochs: PositiveInt = 40
    patience: PositiveInt = 8        # early stopping on dev weighted F1
    seed: Seed = 0
    # several seeds: the head is trained once per seed, metrics reported as mean ± std, the best-dev seed kept
    seeds: Annotated[list[Seed], Field(min_length=1)] | None = None
    device: Device = "auto"
    # torch threads while a head trains on a CPU (0: torch's default, every core); see heads/trainer.py
    threads: NonNegativeInt = 1
    grad_clip: NonNegativeFloat = 1.0   # 0: no clipping
    # categorical heads: CE weighted per class from the train split's counts (none | inverse | sqrt_inverse)
    class_weights: Literal["none", "inverse", "sqrt_inverse"] = "none"
    focal_gamma: NonNegativeFloat = 0.0   # > 0: focal loss (1 - p_y)^gamma CE; 0: plain (weighted) CE

    def __post_init__(self):
        if self.seeds and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must differ from each other (a repeated seed repeats a run): {self.seeds}")


@dataclass(config=FORBID)
class HeadParams:
    head: str                                   # registry name in heads/
    task: Literal["categorical", "dimensional"] = "categorical"   # softmax over labels | regression
    modalities: Annotated[list[Modality], Field(min_length=1)] = dataclasses.field(
        default_factory=lambda: ["text", "audio", "visual"])
    options: dict[str, Any] = dataclasses.field(default_factory=dict)     # head-specific (ercflow/check.py)
    features: dict[Modality, Name] = dataclasses.field(default_factory=dict)   # per-head override of `features`
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)     # overrides of the shared trainer


@dataclass(config=FORBID)
class DistilParams:
    """Students distilled from a teacher store (TelME's audio/visual students; stage finetune_student)."""
    teacher: Optional[Name] = None   # a fine-tuned text teacher (in `teachers`): its store's logits and features
    students: list[Name] = dataclasses.field(default_factory=list)   # entries of `finetune`, fine-tuned against it


@dataclass(config=FORBID)
class Params:
    datasets: list[Name] = dataclasses.field(default_factory=list)    # what `dvc repro` runs
    samples: list[Name] = dataclasses.field(default_factory=list)     # synthetic datasets generated (make_sample)
    extract: list[Name] = dataclasses.field(default_factory=list)
    teachers: list[Name] = dataclasses.field(default_factory=list)
    train: list[Name] = dataclasses.field(default_factory=list)
    sample: SampleParams = dataclasses.field(default_factory=SampleParams)
    data: dict[Name, DatasetParams] = dataclasses.field(default_factory=dict)
    decode: DecodeParams = dataclasses.field(default_factory=DecodeParams)
    encoders: dict[Name, dict[str, Any]] = dataclasses.field(default_factory=dict)   # each with its `kind`
    features: dict[Modality, Name] = dataclasses.field(default_factory=dict)  # modality -> store feeding heads
    trainer: TrainerParams = dataclasses.field(default_factory=TrainerParams)
    heads: dict[Name, HeadParams] = dataclasses.field(default_factory=dict)
    finetune: dict[Name, dict[str, Any]] = dataclasses.field(default_factory=dict)   # by kind (pipeline/configs.py)
    distil: DistilParams = dataclasses.field(default_factory=DistilParams)
    # the report (pipeline/params/evaluation.py): headline metrics per dataset (default: the field's,
    # pipeline/metrics.py), confidence intervals and paired tests, cross-corpus runs, the papers' claims
    headline: dict[Name, Annotated[list[MetricKey], Field(min_length=1)]] = dataclasses.field(default_factory=dict)
    significance: SignificanceParams = dataclasses.field(default_factory=SignificanceParams)
    cross_corpus: dict[Name, CrossParams] = dataclasses.field(default_factory=dict)
    claims: list[ClaimParams] = dataclasses.field(default_factory=list)

    def head(self, name: str) -> HeadParams:
        if name not in self.heads:
            raise ParamsError(f"heads: no head '{name}'; defined: {sorted(self.heads)}")
        return self.heads[name]

    def trainer_for(self, name: str) -> TrainerParams:
        overrides = {k: v for k, v in self.head(name).trainer.items() if v is not None}   # null: the shared value
        merged = {**dataclasses.asdict(self.trainer), **overrides}
        return from_dict(TrainerParams, merged, f"heads.{name}.trainer")

    def feature_stores(self, dataset: str, head: str) -> dict[str, str]:
        """modality -> the feature store head `head` reads on `dataset` (`features`, then its own override)."""
        hp = self.head(head)
        chosen = {**self.features, **hp.features}
        missing = [m for m in hp.modalities if m not in chosen]
        if missing:
            raise ParamsError(f"features: no store chosen for modality {missing} (params `features` / "
                              f"heads.{head}.features)")
        return {m: paths.features(dataset, chosen[m]) for m in hp.modalities}

    def seeds_for(self, name: str) -> list[int]:
        """The seeds head `name` is trained with: `trainer.seeds`, else `[trainer.seed]`."""
        trainer = self.trainer_for(name)
        return list(trainer.seeds) if trainer.seeds else [trainer.seed]

    def dataset(self, name: str) -> DatasetParams:
        if name not in self.data:
            raise ParamsError(f"data: no dataset '{name}'; defined: {sorted(self.data)}")
        return self.data[name]

    def protocol(self, name: str) -> ProtocolParams:
        """Dataset `name`'s evaluation protocol (a preset resolved)."""
        return resolve_protocol(self.dataset(name).protocol)

    def encoder(self, name: str):
        """The config dataclass instance of encoder `name` (its kind: `self.encoders[name]["kind"]`)."""
        if name not in self.encoders:
            raise ParamsError(f"encoders: no encoder '{name}'; defined: {sorted(self.encoders)}")
        raw = dict(self.encoders[name])
        kind = raw.pop("kind", None)
        raw.pop("modality", None)
        if kind not in ENCODER_CONFIGS:
            raise ParamsError(f"encoders.{name}.kind: unknown encoder kind {kind!r}; known: {ENCODER_CONFIGS.names()}")
        return from_dict(ENCODER_CONFIGS[kind], raw, f"encoders.{name}")

    def finetune_entry(self, name: str):
        """The params of `finetune.<name>`, a teacher or a student (`TextFinetuneParams` when it has no `kind`;
        the params dataclass of its `kind` otherwise)."""
        if name not in self.finetune:
            raise ParamsError(f"finetune: no teacher '{name}'; defined: {sorted(self.finetune)}")
        raw = dict(self.finetune[name])
        kind = raw.setdefault("kind", DEFAULT_FINETUNE_KIND)
        if kind not in FINETUNE_CONFIGS:
            raise ParamsError(f"finetune.{name}.kind: unknown kind {kind!r}; known: {FINETUNE_CONFIGS.names()}")
        return from_dict(FINETUNE_CONFIGS[kind], raw, f"finetune.{name}")

    def store_modality(self, name: str) -> str | None:
        """The modality of the store written by encoder or fine-tune `name` (None: no such one)."""
        return store_modality(name, self.encoders, self.finetune)
