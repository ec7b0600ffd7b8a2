"""The config of every encoder kind and of text fine-tuning: plain dataclasses, validated by the params
schema (pipeline/params.py builds its pydantic models from them) and read by the encoders.

They live here, apart from the encoders, so that reading params.yaml imports no model code: a stage that only
prepares a manifest does not depend on (and is not re-run by DVC for an edit of) the encoders' code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from pipeline.params import (Autocast, Device, Dropout, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                             Quantize, Seed)


@dataclass
class HFTextConfig:
    weights: str
    revision: str | None = None
    input_format: Literal["utterance", "indi_context", "prompt"] = "utterance"
    pooling: Literal["cls", "mean", "mask"] = "cls"
    context_window: int | None = None   # K; None: the whole history (prompt) / 5 (indi_context)
    speaker_tokens: PositiveInt = 9     # N of <s1>..<sN>; later speakers share <sN>
    max_length: PositiveInt = 256
    batch_size: PositiveInt = 32
    device: Device = "auto"
    autocast: Autocast = "bf16"         # CUDA only: bf16 | fp16 | none
    quantize: Quantize = "none"         # CPU only: int8 (dynamic int8 Linear layers) | none
    return_sequence: bool = False       # also store per-token features (ragged)
    on_empty: Literal["mask", "fail"] = "mask"   # an utterance with empty text
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)


@dataclass
class OpenSmileConfig:
    feature_set: Literal["eGeMAPSv02", "ComParE_2016"] = "eGeMAPSv02"   # the keys of OPENSMILE_SETS
    min_seconds: PositiveFloat = 0.1   # shorter audio is masked: functionals of a few frames are noise
    silence_dbfs: float = -60.0   # audio whose RMS level is below this is masked as silent
    workers: int = -1             # processes running openSMILE side by side, 8 utterances per task
                                  # (-1: one per available CPU core, at most 8; 0: in this process)
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)


@dataclass
class HFAudioConfig:
    weights: str                     # hub id or local dir: WavLM, data2vec-audio, wav2vec2, HuBERT, ...
    revision: str | None = None
    layer: int = -1                  # which hidden layer to pool (-1: the last)
    max_seconds: PositiveFloat = 20.0   # longer audio is cut (memory grows with length)
    min_seconds: PositiveFloat = 0.1
    silence_dbfs: float = -60.0      # audio whose RMS level is below this is masked as silent
    batch_size: int = 0              # 0: 8 on CUDA, 1 on a CPU (see clip_batch_size)
    device: Device = "auto"
    autocast: Autocast = "bf16"      # CUDA only: bf16 | fp16 | none
    quantize: Quantize = "none"      # CPU only: int8 (dynamic int8 Linear layers) | none
    return_sequence: bool = False    # also store the frame sequence (ragged, ~50 frames/s)
    prep_workers: int = -1           # DataLoader workers for feature extraction (-1: 2 on CUDA, 0 on CPU)
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)


@dataclass
class Cnn3dConfig:
    weights: str | None = None   # a state_dict (.pt) of C3D(width, out_dim); None: random init
    seed: int = 0
    width: PositiveInt = 32
    out_dim: PositiveInt = 128
    frames: PositiveInt = 16     # clip length, uniform over the store's frames (repeating when it holds fewer)
    batch_size: PositiveInt = 16
    device: Device = "auto"
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)


@dataclass
class HFVideoConfig:
    weights: str                  # hub id or local dir of a video transformer (TimeSformer, VideoMAE, ViViT)
    revision: str | None = None
    pooling: Literal["cls", "mean"] = "cls"   # cls | mean (over the patch tokens)
    batch_size: int = 0           # 0: 8 on CUDA, 1 on a CPU (see clip_batch_size)
    device: Device = "auto"
    autocast: Autocast = "bf16"   # CUDA only: bf16 | fp16 | none
    quantize: Quantize = "none"   # CPU only: int8 (dynamic int8 Linear layers) | none
    prep_workers: int = -1        # DataLoader workers reading + processing frames (-1: 2 on CUDA, 0 on CPU)
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)


@dataclass
class VisExtNetConfig:
    weights: str                  # local dir / hub id of an image classifier (MultiEMO: ResNet-101, 2048->1000)
    revision: str | None = None
    detector: Literal["haar", "full"] = "haar"   # haar: OpenCV's bundled frontal-face cascade | full: the whole frame is the face
    max_frames: PositiveInt = 20  # MultiEMO looks at up to 20 frames
    min_face: PositiveInt = 24    # smallest face side (pixels of the stored frame) the detector reports
    face_size: PositiveInt = 224
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    batch_size: PositiveInt = 64  # faces per CNN batch
    device: Device = "auto"
    autocast: Autocast = "bf16"
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)


@dataclass
class FinetuneParams:
    weights: str                          # hub id / local dir / package:<module>/<dir>
    revision: str | None = None
    input_format: Literal["indi_context", "prompt", "utterance"] = "indi_context"   # DialogueTRM | TelME | -
    pooling: Literal["cls", "mean", "mask"] = "cls"   # mask: the prompt's <mask> token (prompt only)
    context_window: int | None = None
    speaker_tokens: PositiveInt = 9
    max_length: PositiveInt = 256
    lr: PositiveFloat = 6e-6              # DialogueTRM 6e-6 (1200 warmup steps); TelME 1e-5
    warmup_steps: NonNegativeInt = 1200
    weight_decay: NonNegativeFloat = 0.01
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    patience: PositiveInt = 3             # epochs without dev WF1 improvement
    class_weights: bool = False           # inverse-frequency CE weights (MELD is 47% neutral)
    gradient_checkpointing: bool = False
    autocast: Autocast = "bf16"           # CUDA only
    dropout: Dropout = 0.1
    device: Device = "auto"
    seed: Seed = 0
    save_every_steps: NonNegativeInt = 200   # a resumable checkpoint this often (and at each epoch's end); 0: epochs only
    eval_batch_size: PositiveInt = 32
    # batches of similar token length (shuffle, sort by length within mega-batches of 50 batches, shuffle the
    # batches): less padding, ~2.5x less compute per epoch on MELD; changes the batches, so results move a little
    group_by_length: bool = False


# how an encoder is run, not what it computes: left out of a store's provenance and fingerprint (a store made
# by 4 processes is the one 1 process makes, byte for byte: tests/test_distributed.py)
RUN_ONLY = ("procs",)


class EncoderKind(NamedTuple):
    modality: str
    Config: type


# kind -> what the params schema needs of it; pipeline.encoders' registry must agree (tested)
KINDS = {
    "hf_text": EncoderKind("text", HFTextConfig),
    "opensmile": EncoderKind("audio", OpenSmileConfig),
    "hf_audio": EncoderKind("audio", HFAudioConfig),
    "cnn3d": EncoderKind("visual", Cnn3dConfig),
    "hf_video": EncoderKind("visual", HFVideoConfig),
    "visextnet": EncoderKind("visual", VisExtNetConfig),
}
