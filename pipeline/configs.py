"""The config of every encoder kind and of fine-tuning (text, audio, video): plain dataclasses, validated by the params
schema (pipeline/params/ builds its pydantic models from them) and read by the encoders.

They live here, apart from the encoders, so that reading params.yaml imports no model code: a stage that only
prepares a manifest does not depend on (and is not re-run by DVC for an edit of) the encoders' code.

Each config is registered under its `kind` with its `modality`: `ENCODER_CONFIGS` (encoders.<name>.kind) and
`FINETUNE_CONFIGS` (finetune.<name>.kind) are the one list of kinds; pipeline/encoders registers each encoder
class under its config's kind, so the two cannot disagree.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field
from pydantic.dataclasses import dataclass as strict_dataclass

from pipeline.prompts import instruction_problem   # a leaf: no model code
from pipeline.registry import Registry
from pipeline.vocab import (FORBID, Autocast, Device, Dropout, Modality, NonNegativeFloat, NonNegativeInt,
                            PositiveFloat, PositiveInt, Quantize, Runtime, Seed)

ENCODER_CONFIGS: Registry[type] = Registry("encoder kind")    # kind -> config dataclass (its `modality`)
FINETUNE_CONFIGS: Registry[type] = Registry("fine-tune kind")   # kind -> params dataclass (its `modality`)
DEFAULT_FINETUNE_KIND = "hf_text"   # a `finetune.<name>` without `kind` is a text teacher (as before kinds)

# how an encoder is run, not what it computes: left out of a store's provenance and fingerprint (a store made
# by 4 processes is the one 1 process makes, byte for byte: tests/test_distributed.py)
RUN_ONLY = ("procs",)

# which hidden states a transformers encoder keeps (pipeline/encoders/layers.py): `last` (the model's output,
# `pooled` [N, D]), `all`, or a list of `hidden_states` indices (0 = embeddings, -1 = the last layer); several
# layers make `pooled` [N, L, D] and the heads learn a weighted sum of them (heads/layers.py)
Layers = Union[Literal["last", "all"], Annotated[list[int], Field(min_length=1)]]


# --- what every transformers-backed model shares -----------------------------------------------------------

@dataclass(kw_only=True)
class HFConfig:
    """A transformers model: its weights (hub id, local dir or `package:<module>/<dir>`) at a revision, the
    device it runs on and the CUDA autocast precision (fine-tunes and every `hf_*` / visextnet encoder)."""
    modality: ClassVar[Modality]
    weights: str
    revision: str | None = None
    device: Device = "auto"
    autocast: Autocast = "bf16"       # CUDA only: bf16 | fp16 | none


@dataclass(kw_only=True)
class HFEncoderConfig(HFConfig):
    """A frozen transformers encoder, which may also run quantised or under ONNX Runtime on a CPU."""
    quantize: Quantize = "none"       # CPU only: int8 (dynamic int8 Linear layers) | none
    runtime: Runtime = "torch"        # CPU only: onnx runs the model with ONNX Runtime (float32)


# --- encoders.<name>, by kind --------------------------------------------------------------------------------

@ENCODER_CONFIGS.register("hf_text")
@dataclass(kw_only=True)
class HFTextConfig(HFEncoderConfig):
    modality: ClassVar[Modality] = "text"
    # instruction: a decoder-only LLM's prompt, its labels scored into the store's `logits` (pipeline/prompts.py)
    input_format: Literal["utterance", "indi_context", "prompt", "instruction"] = "utterance"
    # target_mean: the mean of the target utterance's tokens only (indi_context / prompt / instruction), the model
    # attending over the whole input; last: the last non-padding token (a decoder-only LLM's summary position)
    pooling: Literal["cls", "mean", "mask", "target_mean", "last"] = "cls"
    context_window: int | None = None   # K; None: the whole history (prompt) / 5 (indi_context)
    speaker_tokens: PositiveInt = 9     # N of <s1>..<sN>; later speakers share <sN>
    max_length: PositiveInt = 256
    batch_size: PositiveInt = 32
    return_sequence: bool = False       # also store per-token features (ragged)
    on_empty: Literal["mask", "fail"] = "mask"   # an utterance with empty text
    layers: Layers = "last"             # last | all | [i, j, ...]: hidden states kept (several: [N, L, D])
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)
    # CPU: int8 (dynamic int8 Linear layers); CUDA, through bitsandbytes: nf4 (4-bit NF4, arXiv:2305.14314) |
    # int8_bnb (LLM.int8(), arXiv:2208.07339) | none
    quantize: Literal["int8", "nf4", "int8_bnb", "none"] = "none"
    weights_dtype: Literal["float32", "bf16"] = "float32"   # CUDA only: bf16 loads the weights in bfloat16
    # input_format instruction: the template, with {history} {speaker} {utterance} {labels} (None: the default)
    instruction: str | None = None
    label_words: dict[str, str] | None = None   # instruction: label -> the word scored for it (default: its name)

    def __post_init__(self):
        problem = instruction_problem(self.input_format, self.pooling, self.instruction, self.label_words)
        if problem is None and self.quantize in ("nf4", "int8_bnb"):
            problem = bitsandbytes_problem(self.quantize, self.device)
        if problem:
            raise ValueError(problem)


@ENCODER_CONFIGS.register("opensmile")
@dataclass
class OpenSmileConfig:
    modality: ClassVar[Modality] = "audio"
    feature_set: Literal["eGeMAPSv02", "ComParE_2016"] = "eGeMAPSv02"   # the keys of OPENSMILE_SETS
    min_seconds: PositiveFloat = 0.1   # shorter audio is masked: functionals of a few frames are noise
    silence_dbfs: float = -60.0   # audio whose RMS level is below this is masked as silent
    workers: int = -1             # processes running openSMILE side by side, 8 utterances per task
                                  # (-1: one per available CPU core, at most 8; 0: in this process)
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)


@ENCODER_CONFIGS.register("hf_audio")
@dataclass(kw_only=True)
class HFAudioConfig(HFEncoderConfig):
    """WavLM, data2vec-audio, wav2vec2, HuBERT, ... (`weights`)."""
    modality: ClassVar[Modality] = "audio"
    layer: int = -1                  # older spelling of `layers: [k]` (-1: not given)
    layers: Layers = "last"          # last | all | [i, j, ...]: hidden states kept (several: [N, L, D])
    max_seconds: PositiveFloat = 20.0   # longer audio is cut (memory grows with length)
    min_seconds: PositiveFloat = 0.1
    silence_dbfs: float = -60.0      # audio whose RMS level is below this is masked as silent
    batch_size: int = 0              # 0: 8 on CUDA, 1 on a CPU (see clip_batch_size)
    return_sequence: bool = False    # also store the frame sequence (ragged, ~50 frames/s)
    prep_workers: int = -1           # DataLoader workers for feature extraction (-1: 2 on CUDA, 0 on CPU)
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)


@ENCODER_CONFIGS.register("cnn3d")
@dataclass
class Cnn3dConfig:
    modality: ClassVar[Modality] = "visual"
    weights: str | None = None   # a state_dict (.pt) of C3D(width, out_dim); None: random init
    seed: int = 0
    width: PositiveInt = 32
    out_dim: PositiveInt = 128
    frames: PositiveInt = 16     # clip length, uniform over the store's frames (repeating when it holds fewer)
    batch_size: PositiveInt = 16
    device: Device = "auto"
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)


@ENCODER_CONFIGS.register("hf_video")
@dataclass(kw_only=True)
class HFVideoConfig(HFEncoderConfig):
    """A video transformer (`weights`: TimeSformer, VideoMAE, ViViT)."""
    modality: ClassVar[Modality] = "visual"
    pooling: Literal["cls", "mean"] = "cls"   # cls | mean (over the patch tokens)
    layers: Layers = "last"       # last | all | [i, j, ...]: hidden states kept (several: [N, L, D])
    batch_size: int = 0           # 0: 8 on CUDA, 1 on a CPU (see clip_batch_size)
    prep_workers: int = -1        # DataLoader workers reading + processing frames (-1: 2 on CUDA, 0 on CPU)
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)


@ENCODER_CONFIGS.register("visextnet")
@dataclass(kw_only=True)
class VisExtNetConfig(HFConfig):
    """An image classifier run on detected faces (`weights`; MultiEMO: ResNet-101, 2048->1000)."""
    modality: ClassVar[Modality] = "visual"
    detector: Literal["haar", "full"] = "haar"   # haar: OpenCV's bundled frontal-face cascade | full: the whole frame is the face
    max_frames: PositiveInt = 20  # MultiEMO looks at up to 20 frames
    min_face: PositiveInt = 24    # smallest face side (pixels of the stored frame) the detector reports
    face_size: PositiveInt = 224
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    batch_size: PositiveInt = 64  # faces per CNN batch
    procs: PositiveInt = 1   # processes computing the store side by side (torchrun; pipeline/distributed.py)


# --- finetune.<name>, by kind --------------------------------------------------------------------------------

@strict_dataclass(config=FORBID)
class LoraParams:
    """`finetune.<name>.lora`: train low-rank adapters (LoRA, arXiv 2106.09685, through peft) instead of the
    model's weights, which stay frozen (pipeline/finetune/lora.py). Only the adapter is saved."""
    r: PositiveInt = 16                 # rank; the anchors use 16-32 (BiosERC, PRC-Emo: 32)
    alpha: PositiveFloat = 32.0         # the update is scaled by alpha / r (2 r, as is common)
    dropout: Dropout = 0.05             # on the adapter's input (QLoRA, arXiv 2305.14314: 0.05-0.1)
    # all-linear: every linear layer of the model but its output layer (QLoRA found all layers needed to match a
    # full fine-tune); or the modules' names, e.g. [q_proj, v_proj] (InstructERC's LLaMA-Factory default)
    target_modules: Union[Literal["all-linear"], Annotated[list[str], Field(min_length=1)]] = "all-linear"
    # QLoRA: the frozen base loaded through bitsandbytes on CUDA (nf4: 4-bit NormalFloat, arXiv 2305.14314;
    # int8_bnb: LLM.int8(), arXiv 2208.07339); refused elsewhere
    quantize: Literal["none", "nf4", "int8_bnb"] = "none"


@dataclass(kw_only=True)
class FinetuneBase(HFConfig):
    """What every fine-tune shares (pipeline/finetune/): base weights, objective, optimiser, batches, run."""
    # ce: cross-entropy on the labels | telme_student: CE + alpha DIST + beta feature KD against the teacher
    # store named by `distil.teacher` (TelME eq. 6-15; stage finetune_student)
    objective: Literal["ce", "telme_student"] = "ce"
    paper_defaults: Literal["meld", "iemocap", "meld_table", "iemocap_table"] | None = None   # telme_student: TelME's alpha, beta, taus (public code; *_table: Table 9)
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
    dropout: Dropout = 0.1
    seed: Seed = 0
    save_every_steps: NonNegativeInt = 200   # a resumable checkpoint this often (and at each epoch's end); 0: epochs only
    eval_batch_size: PositiveInt = 32
    # batches of similar input length (shuffle, sort by length within mega-batches of 50 batches, shuffle the
    # batches): 2.6x less CPU per epoch on MELD, but 1.0-1.4 dev WF1 lower after one epoch (docs/benchmarks.md)
    group_by_length: bool = False
    # each step's rows (batch_size x grad_accum x processes, drawn as shuffled batches of that size are) sorted
    # by length before they are cut into the step's grad_accum micro-batches: the step sees a shuffled batch,
    # each micro-batch padded only to its own longest input; 1.94x less CPU per epoch on MELD (4 x 8) at the
    # shuffle's dev WF1 (docs/benchmarks.md); needs grad_accum > 1
    sort_micro_batches: bool = False
    procs: PositiveInt = 1   # processes training side by side (torchrun, DistributedDataParallel); run-only
    lora: LoraParams | None = None   # train LoRA adapters on the frozen model (None: every weight is trained)

    def __post_init__(self):
        if isinstance(self.lora, Mapping):   # built in Python rather than read from params
            self.lora = LoraParams(**self.lora)
        if self.lora is not None and self.lora.quantize != "none":
            if problem := bitsandbytes_problem(self.lora.quantize, self.device):
                raise ValueError(f"lora.{problem}")
        if self.sort_micro_batches and self.grad_accum == 1:
            raise ValueError("sort_micro_batches sorts a step's rows into its grad_accum micro-batches: set grad_accum "
                             "> 1 (e.g. batch_size 8, grad_accum 4 for steps of 32)")
        if self.sort_micro_batches and self.group_by_length:
            raise ValueError("sort_micro_batches and group_by_length both arrange batches by length: set one of "
                             "them to false")


@FINETUNE_CONFIGS.register("hf_text")
@dataclass(kw_only=True)
class TextFinetuneParams(FinetuneBase):
    """A text encoder fine-tuned on the labels (the text teacher: DialogueTRM's BERT, TelME's RoBERTa)."""
    modality: ClassVar[Modality] = "text"
    kind: Literal["hf_text"] = "hf_text"
    # DialogueTRM | TelME | - | a decoder-only LLM's instruction prompt (pipeline/prompts.py; InstructERC-style)
    input_format: Literal["indi_context", "prompt", "utterance", "instruction"] = "indi_context"
    # mask: the prompt's <mask> token (prompt only); last: the last real token (a decoder-only LLM's answer position)
    pooling: Literal["cls", "mean", "mask", "last"] = "cls"
    context_window: int | None = None
    speaker_tokens: PositiveInt = 9
    max_length: PositiveInt = 256
    instruction: str | None = None              # input_format instruction: the template (None: the default)
    label_words: dict[str, str] | None = None   # instruction: label -> the word scored for it (default: its name)
    # what the logits are: label_words, each label word's log-probability as the answer from the LLM's own LM head
    # (what InstructERC, BiosERC and PRC-Emo train: they generate the label word; no new weights) | linear, a
    # linear layer on the pooled token. None: label_words for input_format instruction, else linear
    classifier: Literal["linear", "label_words"] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.input_format == "instruction" or self.instruction is not None or self.label_words is not None:
            if problem := instruction_problem(self.input_format, self.pooling, self.instruction, self.label_words):
                raise ValueError(problem)
        if self.classifier == "label_words" and self.input_format != "instruction":
            raise ValueError("classifier: label_words scores the label words at an instruction prompt's answer "
                             f"position: set input_format: instruction (not {self.input_format!r})")

    @property
    def scores_label_words(self) -> bool:
        """The logits are the label words' log-probabilities (`classifier`, default by input format)."""
        return (self.classifier or ("label_words" if self.input_format == "instruction" else "linear")) == "label_words"


@FINETUNE_CONFIGS.register("hf_audio")
@dataclass(kw_only=True)
class AudioFinetuneParams(FinetuneBase):
    """A speech encoder fine-tuned from its pretrained weights (TelME's audio student: data2vec-audio), its
    frames mean-pooled over the model's frame mask, input prepared by the hf_audio encoder's processor."""
    modality: ClassVar[Modality] = "audio"
    kind: Literal["hf_audio"]
    max_seconds: PositiveFloat = 20.0     # longer audio is cut (memory grows with length)
    min_seconds: PositiveFloat = 0.1      # shorter audio is masked (not trained on; zero in the store)
    silence_dbfs: float = -60.0           # audio whose RMS level is below this is masked as silent
    lr: PositiveFloat = 1e-5              # TelME: AdamW 1e-5
    warmup_steps: NonNegativeInt = 0
    group_by_length: bool = True          # audio batches of similar duration


@FINETUNE_CONFIGS.register("hf_video")
@dataclass(kw_only=True)
class VideoFinetuneParams(FinetuneBase):
    """A video transformer fine-tuned from its pretrained weights (TelME's visual student: TimeSformer), on
    `num_frames` of the media store's frames prepared by the hf_video encoder's image processor."""
    modality: ClassVar[Modality] = "visual"
    kind: Literal["hf_video"]
    pooling: Literal["cls", "mean"] = "cls"   # cls | mean (over the patch tokens)
    lr: PositiveFloat = 1e-5
    warmup_steps: NonNegativeInt = 0


def store_modality(name: str, encoders: Mapping, finetune: Mapping) -> str | None:
    """The modality of the store that raw entry `encoders.<name>` or `finetune.<name>` writes, by its kind
    (an encoder of an unknown kind: its `modality` key; None: no such entry)."""
    if isinstance(encoders.get(name), dict):
        kind = encoders[name].get("kind")
        return ENCODER_CONFIGS[kind].modality if kind in ENCODER_CONFIGS else encoders[name].get("modality")
    if name in finetune:
        cfg = finetune[name] if isinstance(finetune[name], dict) else {}
        kind = cfg.get("kind", DEFAULT_FINETUNE_KIND)
        return FINETUNE_CONFIGS[kind].modality if kind in FINETUNE_CONFIGS else "text"
    return None


def bitsandbytes_problem(quantize: str, device: str) -> str | None:
    """Why `quantize: nf4 | int8_bnb` cannot run on `device` here (bitsandbytes on CUDA only), or None."""
    import importlib.util

    import torch   # here, not at the top: reading params imports torch only for a bitsandbytes request

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dev.type != "cuda":
        return (f"quantize: {quantize} loads the weights through bitsandbytes, on CUDA only, but the device is "
                f"{dev.type}" + (" (device auto: this machine has no CUDA)" if device == "auto" else "")
                + ": use quantize: none (or int8 on a CPU)")
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"quantize: {quantize} needs the bitsandbytes package (pip install bitsandbytes)"
    return None
