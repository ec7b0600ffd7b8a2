"""The config of every encoder kind and of fine-tuning (text, audio, video): plain dataclasses, validated by the params
schema (pipeline/params.py builds its pydantic models from them) and read by the encoders.

They live here, apart from the encoders, so that reading params.yaml imports no model code: a stage that only
prepares a manifest does not depend on (and is not re-run by DVC for an edit of) the encoders' code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple, Union

from pydantic import Field

from pipeline.params import (Autocast, Device, Dropout, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                             Quantize, Seed)

# which hidden states a transformers encoder keeps (pipeline/encoders/layers.py): `last` (the model's output,
# `pooled` [N, D]), `all`, or a list of `hidden_states` indices (0 = embeddings, -1 = the last layer); several
# layers make `pooled` [N, L, D] and the heads learn a weighted sum of them (heads/layers.py)
Layers = Union[Literal["last", "all"], Annotated[list[int], Field(min_length=1)]]


@dataclass
class HFTextConfig:
    weights: str
    revision: str | None = None
    input_format: Literal["utterance", "indi_context", "prompt"] = "utterance"
    # target_mean: the mean of the target utterance's tokens only (indi_context / prompt), the model attending
    # over the whole input
    pooling: Literal["cls", "mean", "mask", "target_mean"] = "cls"
    context_window: int | None = None   # K; None: the whole history (prompt) / 5 (indi_context)
    speaker_tokens: PositiveInt = 9     # N of <s1>..<sN>; later speakers share <sN>
    max_length: PositiveInt = 256
    batch_size: PositiveInt = 32
    device: Device = "auto"
    autocast: Autocast = "bf16"         # CUDA only: bf16 | fp16 | none
    quantize: Quantize = "none"         # CPU only: int8 (dynamic int8 Linear layers) | none
    runtime: Literal["torch", "onnx"] = "torch"   # CPU only: onnx runs the model with ONNX Runtime (float32)
    return_sequence: bool = False       # also store per-token features (ragged)
    on_empty: Literal["mask", "fail"] = "mask"   # an utterance with empty text
    layers: Layers = "last"             # last | all | [i, j, ...]: hidden states kept (several: [N, L, D])
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
    layer: int = -1                  # older spelling of `layers: [k]` (-1: not given)
    layers: Layers = "last"          # last | all | [i, j, ...]: hidden states kept (several: [N, L, D])
    max_seconds: PositiveFloat = 20.0   # longer audio is cut (memory grows with length)
    min_seconds: PositiveFloat = 0.1
    silence_dbfs: float = -60.0      # audio whose RMS level is below this is masked as silent
    batch_size: int = 0              # 0: 8 on CUDA, 1 on a CPU (see clip_batch_size)
    device: Device = "auto"
    autocast: Autocast = "bf16"      # CUDA only: bf16 | fp16 | none
    quantize: Quantize = "none"      # CPU only: int8 (dynamic int8 Linear layers) | none
    runtime: Literal["torch", "onnx"] = "torch"   # CPU only: onnx runs the model with ONNX Runtime (float32)
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
    layers: Layers = "last"       # last | all | [i, j, ...]: hidden states kept (several: [N, L, D])
    batch_size: int = 0           # 0: 8 on CUDA, 1 on a CPU (see clip_batch_size)
    device: Device = "auto"
    autocast: Autocast = "bf16"   # CUDA only: bf16 | fp16 | none
    quantize: Quantize = "none"   # CPU only: int8 (dynamic int8 Linear layers) | none
    runtime: Literal["torch", "onnx"] = "torch"   # CPU only: onnx runs the model with ONNX Runtime (float32)
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


@dataclass(kw_only=True)
class FinetuneBase:
    """What every fine-tune shares (pipeline/finetune.py): base weights, objective, optimiser, batches, run."""
    weights: str                          # hub id / local dir / package:<module>/<dir>
    revision: str | None = None
    # ce: cross-entropy on the labels | telme_student: CE + alpha DIST + beta feature KD against the teacher
    # store named by `distil.teacher` (TelME eq. 6-15; stage finetune_student)
    objective: Literal["ce", "telme_student"] = "ce"
    paper_defaults: Literal["meld", "iemocap"] | None = None   # telme_student: TelME Table 9's alpha, beta, taus
    alpha: NonNegativeFloat | None = None         # telme_student, weight of L_response (None: paper_defaults' / 1)
    beta: NonNegativeFloat | None = None          # weight of L_feature (None: paper_defaults' / 1)
    tau_response: PositiveFloat | None = None     # None: paper_defaults' / 2
    tau_feature: PositiveFloat | None = None      # None: paper_defaults' / 1
    lr: PositiveFloat = 6e-6              # DialogueTRM 6e-6 (1200 warmup steps); TelME 1e-5
    warmup_steps: NonNegativeInt = 1200
    weight_decay: NonNegativeFloat = 0.01
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 8           # per process: one step sees batch_size x grad_accum x processes
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
    # batches of similar input length (shuffle, sort by length within mega-batches of 50 batches, shuffle the
    # batches): 2.6x less CPU per epoch on MELD, but 1.0-1.4 dev WF1 lower after one epoch (README, Benchmarks)
    group_by_length: bool = False
    # each step's rows (batch_size x grad_accum x processes, drawn as shuffled batches of that size are) sorted
    # by length before they are cut into the step's grad_accum micro-batches: the step sees a shuffled batch,
    # each micro-batch padded only to its own longest input; 1.94x less CPU per epoch on MELD (4 x 8) at the
    # shuffle's dev WF1 (README, Benchmarks); needs grad_accum > 1
    sort_micro_batches: bool = False
    procs: PositiveInt = 1   # processes training side by side (torchrun, DistributedDataParallel); run-only

    def __post_init__(self):
        if self.sort_micro_batches and self.grad_accum == 1:
            raise ValueError("sort_micro_batches sorts a step's rows into its grad_accum micro-batches: set grad_accum "
                             "> 1 (e.g. batch_size 8, grad_accum 4 for steps of 32)")
        if self.sort_micro_batches and self.group_by_length:
            raise ValueError("sort_micro_batches and group_by_length both arrange batches by length: set one of "
                             "them to false")


@dataclass(kw_only=True)
class FinetuneParams(FinetuneBase):
    """A text encoder fine-tuned on the labels (the text teacher: DialogueTRM's BERT, TelME's RoBERTa)."""
    kind: Literal["hf_text"] = "hf_text"
    input_format: Literal["indi_context", "prompt", "utterance"] = "indi_context"   # DialogueTRM | TelME | -
    pooling: Literal["cls", "mean", "mask"] = "cls"   # mask: the prompt's <mask> token (prompt only)
    context_window: int | None = None
    speaker_tokens: PositiveInt = 9
    max_length: PositiveInt = 256


@dataclass(kw_only=True)
class AudioFinetuneParams(FinetuneBase):
    """A speech encoder fine-tuned from its pretrained weights (TelME's audio student: data2vec-audio), its
    frames mean-pooled over the model's frame mask, input prepared by the hf_audio encoder's processor."""
    kind: Literal["hf_audio"]
    max_seconds: PositiveFloat = 20.0     # longer audio is cut (memory grows with length)
    min_seconds: PositiveFloat = 0.1      # shorter audio is masked (not trained on; zero in the store)
    silence_dbfs: float = -60.0           # audio whose RMS level is below this is masked as silent
    lr: PositiveFloat = 1e-5              # TelME: AdamW 1e-5
    warmup_steps: NonNegativeInt = 0
    group_by_length: bool = True          # audio batches of similar duration


@dataclass(kw_only=True)
class VideoFinetuneParams(FinetuneBase):
    """A video transformer fine-tuned from its pretrained weights (TelME's visual student: TimeSformer), on
    `num_frames` of the media store's frames prepared by the hf_video encoder's image processor."""
    kind: Literal["hf_video"]
    pooling: Literal["cls", "mean"] = "cls"   # cls | mean (over the patch tokens)
    lr: PositiveFloat = 1e-5
    warmup_steps: NonNegativeInt = 0


# finetune.<name>.kind -> its params (the default kind, for entries without one: hf_text, the text teacher)
FINETUNE_KINDS = {"hf_text": FinetuneParams, "hf_audio": AudioFinetuneParams, "hf_video": VideoFinetuneParams}
FINETUNE_MODALITY = {"hf_text": "text", "hf_audio": "audio", "hf_video": "visual"}


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
