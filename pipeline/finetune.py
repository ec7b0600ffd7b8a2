"""Fine-tuning an encoder once per dataset, then caching its best checkpoint as a feature store.

One implementation for every transformers-backed kind (`finetune.<name>.kind`):
- `hf_text` (`TextFinetuner`): the text teacher. The papers' text branch is a fine-tuned encoder (DialogueTRM:
  BERT on `indi_context`; TelME: RoBERTa on `prompt`, the teacher its students distil from); the pooled token
  (cls / mean / the prompt's mask) feeds a linear layer.
- `hf_audio` (`AudioFinetuner`): a speech encoder (TelME's audio student: data2vec-audio), its frames mean-pooled
  over the model's own frame mask; waveforms from the media store, prepared by the `hf_audio` encoder's processor
  (pipeline/encoders/audio.py), too short / silent / undecodable audio masked as that encoder masks it.
- `hf_video` (`VideoFinetuner`): a video transformer (TelME's visual student: TimeSformer) on `num_frames` of the
  media store's frames prepared by the `hf_video` encoder's image processor (pipeline/encoders/visual.py).

Objectives: `ce` (cross-entropy on the labels) or, passed in by the student stage, TelME's student loss
(pipeline/distil.py: CE + alpha DIST + beta feature KD against a teacher store, eq. 6-15). A student whose size
differs from its teacher's gets a linear projection to the teacher's size before its classifier (feature KD
compares the two in one space); the store keeps the projected vector, the student representation TelME's
fusion reads.

Training: AdamW, warmup + linear decay, gradient accumulation, optional class weights, autocast on CUDA,
gradient checkpointing, early stopping on dev weighted F1 (dev only: test is never looked at). The best
checkpoint writes the store: `pooled` and `logits` for every split, with provenance (the checkpoint's content
hash, the base weights, the fine-tune config, and for a student its teacher store's fingerprint) — the same
contract as any feature store, so a head takes it by naming it in params `features`.

`group_by_length: true` (the default for audio) batches inputs of similar length (shuffle; sort by length within
mega-batches of 50 batches; shuffle the batches, the one holding the longest input first so that a batch too
big for memory fails at the first step): far less padding, so shorter epochs (bench/finetune_meld.py). Off for
text by default, and off it leaves the fingerprints of existing checkpoints and teacher stores as they were.
A tqdm bar (pipeline/logs.py `progress`) shows the step, the epoch's running loss, steps/s and the ETA.

Distributed (`procs: N`, or any torchrun launch; pipeline/distributed.py): DistributedDataParallel, gloo on a
CPU and NCCL-free (the gradients' all-reduce goes through the process group the stage joined). Every step sees
one *global* batch of batch_size x N inputs (x grad_accum micro-batches), rank r computing its every N-th
input; each rank's loss is weighted by its share of the global batch, so the averaged gradient is the one a
single process computes on the whole global batch (for `ce`; TelME's KD terms compare the inputs of a rank's
own share, as the paper's per-GPU batches do). The run's identity (fingerprint) holds the global batch, not N:
2 processes x 8 and 1 process x 16 are one run, and either resumes the other's `last` checkpoint exactly where
it stopped; rank 0 writes the checkpoints (with every rank's RNG state) and assembles the store, whose chunks
every rank computes (pipeline/extract.py).

Checkpoints (`<ckpt>/best`, `<ckpt>/last`) hold the encoder (+ tokenizer with the added speaker tokens, or the
audio/image processor) in transformers' format, the classifier (and projection), and — in `last` — optimizer,
scheduler, RNG states and the position in the epoch, so an interrupted fine-tune resumes where its last
checkpoint left it.

Checkpoints travel through the DVC remote, so they are data and never unpickled (DESIGN.md, "Trust
boundary"). A checkpoint directory, written to `.<name>.tmp` and renamed:
    encoder/                     save_pretrained: config.json, model.safetensors, tokenizer / processor files
    classifier.safetensors       the linear layer's `weight`, `bias`
    projection.safetensors       (a student projected to its teacher's size) `weight`, `bias`
    training_state.safetensors   (`last` only) optimizer tensors and RNG states, keyed by their path
    training_state.json          (`last` only) counters, history, optimizer param groups, scheduler, numpy and
                                 Python RNG states; a tensor appears as {"__tensor__": "<key>"}
    checkpoint.json              written last: format, format_version, labels, fingerprint, ...
A directory holding a pickle (`*.pt`, `*.bin`, ...), a damaged or foreign file is refused with a
`CheckpointError` naming the file.
"""
from __future__ import annotations

import json
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from pipeline import distributed
from pipeline.configs import AudioFinetuneParams, FinetuneBase, FinetuneParams, VideoFinetuneParams
from pipeline.encoders import Encoder
from pipeline.encoders.text import load_text_model, pool_hidden, text_inputs, tokenize_pairs
from pipeline.extract import extract
from pipeline.logs import progress
from pipeline.manifest import Manifest
from pipeline.metrics import classification_metrics
from pipeline.params import ParamsError
from pipeline.runtime import autocast_context, resolve_device, resolve_weights, weights_hash
from pipeline.store import (MediaStore, StoreError, atomic_write_text, fingerprint, guarded_write, remove_path,
                            what_to_do)

# checkpoint.json `format` per kind (a checkpoint of another kind is refused, naming both)
CHECKPOINT_FORMATS = {"hf_text": "ercflow.text_checkpoint", "hf_audio": "ercflow.audio_checkpoint",
                      "hf_video": "ercflow.video_checkpoint"}
CHECKPOINT_FORMAT = CHECKPOINT_FORMATS["hf_text"]
CHECKPOINT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")   # never read, refused
MEGA_BATCH = 50   # group_by_length: batches per mega-batch sorted by length (as transformers' LengthGroupedSampler)
# options added after checkpoints and teacher stores were first written: at these values they are left out
# of the fingerprints, so an existing checkpoint / store stays valid (resumable, up to date)
NEUTRAL_ADDITIONS = {"group_by_length": False, "sort_micro_batches": False, "kind": "hf_text", "objective": "ce",
                     "paper_defaults": None, "alpha": None, "beta": None, "tau_response": None, "tau_feature": None}
RUN_ONLY = ("procs",)   # how the fine-tune runs, not what it computes (the global batch is in the fingerprint)


def params_identity(p: FinetuneBase) -> dict:
    """The fine-tune params as they enter fingerprints and the store's `config`."""
    return {k: v for k, v in asdict(p).items()
            if k not in RUN_ONLY and not (k in NEUTRAL_ADDITIONS and v == NEUTRAL_ADDITIONS[k])}


def run_identity(p: FinetuneBase, world: int) -> dict:
    """`params_identity` with `batch_size` the global batch (batch_size x processes): the run's identity."""
    return {**params_identity(p), "batch_size": p.batch_size * world}


def sorted_within(rows: np.ndarray, lengths: np.ndarray, group: int, batch_size: int) -> list[np.ndarray]:
    """`rows` cut into consecutive groups of `group` rows, each sorted by `lengths[row]` (longest first) and
    cut into batches of `batch_size`, in order."""
    batches = []
    for s in range(0, len(rows), group):
        chunk = rows[s:s + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return batches


def length_grouped_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int,
                           rng: np.random.Generator, mega_batch: int = MEGA_BATCH) -> list[np.ndarray]:
    """Batches of `rows` (already shuffled) of similar `lengths[row]`: each mega-batch of `mega_batch`
    batches is sorted by length, longest first, and cut into batches; the batches are shuffled, and the
    one with the longest input goes first (a batch too big for memory fails at once, not hours later)."""
    batches = sorted_within(rows, lengths, mega_batch * batch_size, batch_size)
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if batches:
        first = int(np.argmax([lengths[b].max() for b in batches]))
        batches.insert(0, batches.pop(first))
    return batches


def length_sorted_micro_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int,
                                grad_accum: int) -> list[np.ndarray]:
    """`rows` (already shuffled) cut into steps of batch_size x grad_accum rows, as shuffled batches of that size
    are cut; each step's rows sorted by `lengths[row]`, longest first, and cut into its micro-batches of
    batch_size. A step computes the gradient of the rows a shuffled batch holds, with less padding."""
    return sorted_within(rows, lengths, batch_size * grad_accum, batch_size)


@contextmanager
def no_transformers_bars():
    """transformers draws a "Writing model shards" bar per save_pretrained and a "Loading weights" bar per
    from_pretrained: off around the checkpoint's own saves and loads, then restored as they were."""
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    tf_on, hub_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if tf_on:
            hf_logging.enable_progress_bar()   # re-enables huggingface_hub's bars too
        if hub_off:
            disable_progress_bars()


# -- models -------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """Encoder -> pooled vector (-> projection to a teacher's size) -> dropout -> linear layer. The pooled
    (projected) vector is the feature the store keeps."""

    def __init__(self, encoder, n_labels: int, dropout: float, d_out: int | None = None):
        super().__init__()
        self.encoder = encoder
        d = int(encoder.config.hidden_size)
        self.projection = nn.Linear(d, d_out) if d_out and d_out != d else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_out or d, n_labels)

    def pool(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pool(batch)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return pooled, self.classifier(self.dropout(pooled))


class TextClassifier(Classifier):
    """Text encoder, the feature at the pooling position (cls / mean / the prompt's <mask>)."""

    def __init__(self, encoder, n_labels: int, pooling: str, mask_token_id: int | None, dropout: float,
                 d_out: int | None = None):
        super().__init__(encoder, n_labels, dropout, d_out)
        self.pooling, self.mask_token_id = pooling, mask_token_id

    def pool(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        return pool_hidden(hidden, batch, self.pooling, self.mask_token_id)


class AudioClassifier(Classifier):
    """Speech encoder, its last hidden frames averaged over the model's frame mask (as the hf_audio encoder's
    features are), so padding in a batch never enters the pooled vector."""

    def pool(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state.float()
        frames = self.encoder._get_feature_vector_attention_mask(hidden.shape[1], batch["attention_mask"])
        frames = frames.to(hidden.dtype)
        return (hidden * frames[..., None]).sum(1) / frames.sum(1, keepdim=True).clamp(min=1)


class VideoClassifier(Classifier):
    """Video transformer, its CLS token or the mean of its patch tokens (as the hf_video encoder pools)."""

    def __init__(self, encoder, n_labels: int, pooling: str, dropout: float, d_out: int | None = None):
        super().__init__(encoder, n_labels, dropout, d_out)
        self.pooling = pooling

    def pool(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state.float()
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(1)


class CrossEntropy:
    """The `ce` objective: cross-entropy on the labels (optionally class-weighted)."""
    name = "ce"
    teacher_dim: int | None = None

    def identity(self) -> dict:
        return {}   # nothing beyond the params: fingerprints of text teachers stay as they were

    def provenance(self) -> dict:
        return {}

    def loss(self, rows: np.ndarray, pooled: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
             weight: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, weight=weight)


class TrainedObjective(CrossEntropy):
    """The objective a checkpoint was trained with, known by its name and feature size only: enough to rebuild
    the model (a projection to `teacher_dim`) and predict with it (pipeline/predict.py), not to train it."""

    def __init__(self, name: str, teacher_dim: int | None):
        self.name, self.teacher_dim = name, teacher_dim

    def loss(self, *_, **__):
        raise RuntimeError(f"a checkpoint rebuilt to predict cannot train (its objective {self.name} is not loaded)")


class InterruptTraining(Exception):
    """Raised by a `stop_after_steps` hook (tests simulate a kill with it)."""


class CheckpointError(StoreError):
    """A fine-tune checkpoint that is damaged, foreign, pickled or of a newer format (names the file)."""


class _NoBar:
    """The progress bar of a rank other than 0 (one bar per run)."""

    def update(self, *_):
        pass

    def set_postfix(self, *_, **__):
        pass

    def close(self):
        pass


def _split_tensors(obj, key: str, tensors: dict[str, torch.Tensor]):
    """A JSON-able copy of `obj` with every tensor moved to `tensors[key-path]` and replaced by
    {"__tensor__": key-path}; a dict with non-string keys (the optimizer's parameter ids) becomes
    {"__items__": [[key, value], ...]}, so int keys come back as ints."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split_tensors(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _split_tensors(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"training state at {key!r}: cannot store a {type(obj).__name__} as JSON or a tensor")


def _join_tensors(obj, tensors: dict[str, torch.Tensor]):
    """Inverse of `_split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _join_tensors(v, tensors) for k, v in obj["__items__"]}
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def rng_states() -> dict:
    """torch (CPU and CUDA) RNG states as uint8 tensors; numpy's and Python's global ones as JSON-able."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
            "python": [py_version, list(py_state), py_gauss]}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        st = states["numpy"]
        key = np.array(st["state"]["key"], np.uint32)
        np.random.set_state({**st, "state": {"key": key, "pos": st["state"]["pos"]}})
    if "python" in states:
        version, state, gauss = states["python"]
        random.setstate((version, tuple(state), gauss))


class Finetuner:
    """The training loop, checkpoints and resume shared by every kind; a subclass loads the model and turns
    manifest rows into a batch (`setup`, `collate`), and says what of the data its fingerprint takes."""
    kind: ClassVar[str]          # finetune.<name>.kind
    modality: ClassVar[str]      # text | audio | visual
    store_kind: ClassVar[str]    # the store's encoder_kind
    needs_media: ClassVar[bool] = False
    mega_batch: ClassVar[int] = MEGA_BATCH

    def __init__(self, manifest: Manifest, p: FinetuneBase, ckpt_dir: str | Path, media_path: str | Path | None = None,
                 objective=None):
        if getattr(p, "kind", "hf_text") != self.kind:
            raise ParamsError(f"{type(self).__name__} fine-tunes kind {self.kind}, not {getattr(p, 'kind', None)}")
        self.manifest, self.p, self.ckpt = manifest, p, Path(ckpt_dir)
        self.labels = manifest.meta.labels
        if not self.labels:
            raise ValueError("fine-tuning needs categorical labels")
        if self.needs_media and media_path is None:
            raise ValueError(f"a {self.kind} fine-tune needs the media store")
        self.media_path = Path(media_path) if media_path is not None else None
        self.media = MediaStore(self.media_path) if self.needs_media else None
        self.objective = objective or CrossEntropy()
        self.ranks = distributed.ranks()
        self.device = resolve_device(p.device)
        self.y = manifest.label_index()
        self.problems: list[dict] = []
        rows = np.arange(len(manifest))
        self.usable = np.ones(len(manifest), bool)   # rows with an input (audio/video kept at decode, not silent)
        self.setup()
        identity = {"params": run_identity(p, self.ranks.world), "labels": self.labels, "data": self.data_identity()}
        if self.objective.identity():
            identity["objective"] = self.objective.identity()
        self.fingerprint = fingerprint(identity)
        split = manifest.rows["split"].to_numpy()
        self.rows = {s: rows[(split == s) & (self.y >= 0) & self.usable] for s in ("train", "dev", "test")}

    # -- what a kind provides -----------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the model (`self.model`, a `Classifier`), and set `self.lengths` (per manifest row: what
        length-grouped batches sort by), `self.usable` and `self.problems`."""
        raise NotImplementedError

    def collate(self, rows: np.ndarray) -> dict:
        """The model's input for manifest rows `rows`, on the device."""
        raise NotImplementedError

    def data_identity(self) -> dict | str:
        """What of the data the fingerprint takes (a fine-tune of other data starts over)."""
        raise NotImplementedError

    def save_encoder_extras(self, path: Path) -> None:
        """Save what the encoder needs beside its weights (tokenizer, processor) into `path`."""

    def d_out(self) -> int | None:
        return self.objective.teacher_dim

    def gradient_checkpointing(self, encoder) -> None:
        if not self.p.gradient_checkpointing:
            return
        if not getattr(encoder, "supports_gradient_checkpointing", False):
            raise ParamsError(f"finetune: {type(encoder).__name__} does not support gradient checkpointing "
                              "(set gradient_checkpointing: false)")
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def close(self) -> None:
        if self.media is not None:
            self.media.close()
            self.media = None

    # -- batches ------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches (batch_size x processes rows each): a function of the seed and the epoch
        alone, so a resumed run meets the very batches the interrupted one would have."""
        rng = np.random.default_rng(self.p.seed + epoch)
        order, bs = rng.permutation(self.rows["train"]), self.p.batch_size * self.ranks.world
        if self.p.group_by_length:
            return length_grouped_batches(order, self.lengths, bs, rng, self.mega_batch)
        if self.p.sort_micro_batches:
            return length_sorted_micro_batches(order, self.lengths, bs, self.p.grad_accum)
        return [order[s:s + bs] for s in range(0, len(order), bs)]

    @torch.inference_mode()
    def predict(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pooled features, logits) of `rows`, in length-sorted batches, returned in `rows` order; rows
        without a usable input get zeros."""
        self.model.eval()
        d = self.model.classifier.in_features
        pooled, logits = np.zeros((len(rows), d), np.float32), np.zeros((len(rows), len(self.labels)), np.float32)
        keep = np.flatnonzero(self.usable[rows])
        order = keep[np.argsort(self.lengths[rows[keep]], kind="stable")]
        for s in range(0, len(order), self.p.eval_batch_size):
            idx = order[s:s + self.p.eval_batch_size]
            with autocast_context(self.device, self.p.autocast):
                f, z = self.model(self.collate(rows[idx]))
            pooled[idx], logits[idx] = f.float().cpu().numpy(), z.float().cpu().numpy()
        return pooled, logits

    def gathered_logits(self, rows: np.ndarray) -> np.ndarray:
        """Logits of `rows`; under torchrun each rank predicts its every N-th row and every rank gets them all."""
        r = self.ranks
        if not r.distributed:
            return self.predict(rows)[1]
        import torch.distributed as dist

        parts = [None] * r.world
        dist.all_gather_object(parts, self.predict(rows[r.rank::r.world])[1])
        out = np.zeros((len(rows), len(self.labels)), np.float32)
        for k, part in enumerate(parts):
            out[k::r.world] = part
        return out

    def evaluate(self, split: str) -> dict:
        logits = self.gathered_logits(self.rows[split])
        return classification_metrics(self.y[self.rows[split]], logits.argmax(1), self.labels)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self, name: str, state: dict | None = None) -> Path:
        """Write checkpoint `name` atomically (temp dir, then rename); `state` (the training state of `last`)
        may hold tensors, JSON-able values and dicts keyed by ints (an optimizer's state_dict)."""
        final = self.ckpt / name
        tmp, old = self.ckpt / f".{name}.tmp", self.ckpt / f".{name}.old"
        remove_path(tmp)
        nbytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        with guarded_write(final, tmp, nbytes, "re-run: the fine-tune resumes from its last checkpoint"):
            tmp.mkdir(parents=True)
            with no_transformers_bars():
                self.model.encoder.save_pretrained(tmp / "encoder", safe_serialization=True)
                self.save_encoder_extras(tmp / "encoder")
            pickled = [f.name for f in (tmp / "encoder").iterdir() if f.name.endswith(PICKLE_SUFFIXES)]
            if pickled or not any((tmp / "encoder").glob("*.safetensors")):
                raise CheckpointError(f"{tmp / 'encoder'}: save_pretrained wrote {pickled or 'no safetensors'}; "
                                      "ercflow keeps checkpoints in safetensors only")
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.classifier.state_dict().items()},
                      tmp / "classifier.safetensors")
            if self.model.projection is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.model.projection.state_dict().items()},
                          tmp / "projection.safetensors")
            if state is not None:
                tensors: dict[str, torch.Tensor] = {}
                doc = _split_tensors(state, "state", tensors)
                save_file(tensors, tmp / "training_state.safetensors")
                (tmp / "training_state.json").write_text(json.dumps(doc))
            meta = {"format": CHECKPOINT_FORMATS[self.kind], "format_version": CHECKPOINT_VERSION,
                    "labels": self.labels, **self.checkpoint_info(), "base_weights": self.p.weights,
                    "fingerprint": self.fingerprint, "training_state": state is not None}
            (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=1))   # last: marks a complete dir
            remove_path(old)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            remove_path(old)
        return final

    def checkpoint_info(self) -> dict:
        """What checkpoint.json says of the model beside labels and weights."""
        return {"kind": self.kind, "objective": self.objective.name}

    def checkpoint_meta(self, name: str) -> dict:
        """`checkpoint.json` of checkpoint `name`, after refusing a directory that holds a pickle, a foreign
        or a newer-format checkpoint."""
        path = self.ckpt / name
        if not path.is_dir():
            raise CheckpointError(f"checkpoint not found: {path}")
        for f in sorted(path.rglob("*")):
            if f.name.endswith(PICKLE_SUFFIXES):
                raise CheckpointError(
                    f"{f}: refused: a pickle file in a fine-tune checkpoint (unpickling can run code; ercflow "
                    f"reads checkpoints as safetensors + JSON only); {what_to_do(f, delete=path)}")
        meta = _read_json(path / "checkpoint.json", path)
        want = CHECKPOINT_FORMATS[self.kind]
        if not isinstance(meta, dict) or meta.get("format") != want:
            got = meta.get("format") if isinstance(meta, dict) else None
            what = ("a checkpoint of another kind" if got in CHECKPOINT_FORMATS.values()
                    else "not an ercflow fine-tune checkpoint")
            raise CheckpointError(f"{path / 'checkpoint.json'}: {what} (format {got!r}, this {self.kind} fine-tune "
                                  f"reads {want!r}); {what_to_do(path / 'checkpoint.json', delete=path)}")
        version = meta.get("format_version")
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise CheckpointError(f"{path / 'checkpoint.json'}: format_version {version!r}, this ercflow reads up to "
                                  f"{CHECKPOINT_VERSION}: upgrade ercflow, or delete {path} and re-run the stage")
        return meta

    def load(self, name: str) -> dict | None:
        """Load checkpoint `name` into the model; returns its training state (None for `best`)."""
        from transformers import AutoModel

        path = self.ckpt / name
        meta = self.checkpoint_meta(name)
        if meta.get("labels") != self.labels:
            raise CheckpointError(f"{path / 'checkpoint.json'}: labels {meta.get('labels')} differ from the "
                                  f"manifest's {self.labels}; {what_to_do(path, delete=path)}")
        enc = path / "encoder"
        for f in sorted(enc.glob("*.safetensors")):   # name a damaged file before transformers reads it
            _check_tensors(f, path)
        try:   # safetensors only; a config asking for remote code is refused (trust_remote_code stays off)
            with no_transformers_bars():
                encoder, info = AutoModel.from_pretrained(enc, use_safetensors=True, trust_remote_code=False,
                                                          output_loading_info=True)
        except Exception as e:   # noqa: BLE001  (transformers raises OSError, ValueError, SafetensorError, ...)
            raise CheckpointError(f"{enc}: the encoder does not load ({_first_line(e)}); "
                                  f"{what_to_do(enc, delete=path)}") from e
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if bad:
            raise CheckpointError(f"{enc}: the encoder's weights do not fit its config ({_first_line(bad)}); "
                                  f"{what_to_do(enc, delete=path)}")
        try:
            self.model.encoder.load_state_dict(encoder.state_dict())
        except RuntimeError as e:
            raise CheckpointError(f"{enc}: does not fit this fine-tune's encoder ({_first_line(e)}); "
                                  f"{what_to_do(path, delete=path)}") from e
        parts = [("classifier", self.model.classifier)]
        if self.model.projection is not None or (path / "projection.safetensors").exists():
            parts.append(("projection", self.model.projection))
        for part, module in parts:
            f = path / f"{part}.safetensors"
            tensors = _read_tensors(f, path)
            try:
                if module is None:
                    raise RuntimeError("this fine-tune has no projection (its student and teacher sizes agree)")
                module.load_state_dict(tensors)
            except RuntimeError as e:
                raise CheckpointError(f"{f}: does not fit the {part} ({_first_line(e)}); "
                                      f"{what_to_do(path, delete=path)}") from e
        self.model.to(self.device)
        if not meta.get("training_state"):
            return None
        tensors = _read_tensors(path / "training_state.safetensors", path)
        doc = _read_json(path / "training_state.json", path)
        try:
            return _join_tensors(doc, tensors)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path / 'training_state.json'}: does not match training_state.safetensors "
                                  f"({_first_line(e)}); {what_to_do(path, delete=path)}") from e

    def resumable(self) -> bool:
        """A `last` checkpoint of this very config exists (a pickled or damaged one is refused, not skipped)."""
        if not (self.ckpt / "last").exists():
            return False
        meta = self.checkpoint_meta("last")
        return bool(meta.get("training_state")) and meta.get("fingerprint") == self.fingerprint

    # -- training -------------------------------------------------------------------------------------------
    def class_weight(self) -> torch.Tensor | None:
        if not self.p.class_weights:
            return None
        counts = np.bincount(self.y[self.rows["train"]], minlength=len(self.labels)).astype(np.float64)
        return torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32,
                            device=self.device)

    def train(self, log=print, stop_after_steps: int | None = None) -> dict:
        from transformers import get_linear_schedule_with_warmup

        p, r = self.p, self.ranks
        self.ckpt.mkdir(parents=True, exist_ok=True)
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
        groups = [{"params": [w for n, w in self.model.named_parameters() if not n.endswith(no_decay)],
                   "weight_decay": p.weight_decay},
                  {"params": [w for n, w in self.model.named_parameters() if n.endswith(no_decay)],
                   "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=p.lr)
        steps_per_epoch = -(-len(self.rows["train"]) // (p.batch_size * r.world * p.grad_accum))
        sched = get_linear_schedule_with_warmup(opt, min(p.warmup_steps, p.epochs * steps_per_epoch // 2),
                                                p.epochs * steps_per_epoch)
        weight = self.class_weight()
        y_all = torch.from_numpy(np.array(self.y, np.int64))
        state = {"epoch": 0, "batch": 0, "step": 0, "best": -1.0, "best_epoch": -1, "since": 0, "history": []}
        # numpy's and Python's global RNGs from the seed too: speech models draw their SpecAugment time masks
        # with numpy's (transformers' _compute_mask_indices); a resumed run restores all of them instead
        np.random.seed(p.seed)
        random.seed(p.seed)
        if self.resumable():
            saved = self.load("last")
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            by_rank = saved.get("rng_ranks") or []
            set_rng_states(by_rank[r.rank] if r.rank < len(by_rank) else saved["rng"])
            state = saved["state"]
            log(f"resuming from {self.ckpt / 'last'}: epoch {state['epoch']}, batch {state['batch']}, step {state['step']}")
        resumed_at = state["step"]
        net = self.model
        if r.distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                          else None, find_unused_parameters=True)

        def checkpoint():
            rngs = rng_states()
            doc = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs, "state": state}
            if r.distributed:   # every rank's RNG state (dropout draws differ between ranks)
                import torch.distributed as dist

                every = [None] * r.world
                dist.all_gather_object(every, rngs)
                doc["rng_ranks"] = every
            if r.main:
                self.save("last", doc)

        started = time.perf_counter()
        bar = progress(total=p.epochs * steps_per_epoch, initial=state["step"], desc=f"fine-tune {self.ckpt.name}",
                       unit="step", dynamic_ncols=True) if r.main else _NoBar()
        try:
            while state["epoch"] < p.epochs and state["since"] < p.patience:
                self.model.train()
                batches = self.epoch_batches(state["epoch"])
                # the epoch's loss sum / count and train seconds so far (kept in `last`, so a resumed epoch
                # reports its whole mean loss and time, less the work lost with the interruption)
                tally = state.setdefault("epoch_tally", {"loss": 0.0, "batches": 0, "seconds": 0.0})
                t0 = time.perf_counter()
                bar.set_postfix(epoch=state["epoch"], refresh=False)
                for b in range(state["batch"], len(batches)):
                    rows, share = self.my_share(batches[b], weight)
                    last_micro = (b + 1) % p.grad_accum == 0 or b + 1 == len(batches)
                    # a micro-batch's loss weighs by its share of the step's rows: the step's loss is the mean
                    # over its rows (1 / grad_accum each in a full step; the epoch's last step may be shorter)
                    first = b - b % p.grad_accum
                    micro = len(batches[b]) / sum(len(x) for x in batches[first:first + p.grad_accum])
                    with (net.no_sync() if r.distributed and not last_micro else nullcontext()):
                        batch = self.collate(rows)
                        with autocast_context(self.device, p.autocast):
                            pooled, logits = net(batch)
                        loss = self.objective.loss(rows, pooled, logits, y_all[rows].to(self.device), weight)
                        ((loss * share if r.distributed else loss) * micro).backward()
                    tally["loss"] += float(loss.detach())
                    tally["batches"] += 1
                    state["batch"] = b + 1
                    if last_micro:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                        opt.step()
                        sched.step()
                        opt.zero_grad(set_to_none=True)
                        state["step"] += 1
                        bar.update(1)
                        bar.set_postfix(epoch=state["epoch"], loss=f"{tally['loss'] / tally['batches']:.4f}",
                                        refresh=False)
                        if p.save_every_steps and state["step"] % p.save_every_steps == 0:
                            tally["seconds"] += time.perf_counter() - t0
                            t0 = time.perf_counter()
                            checkpoint()
                        if stop_after_steps is not None and state["step"] - resumed_at >= stop_after_steps:
                            tally["seconds"] += time.perf_counter() - t0
                            checkpoint()
                            raise InterruptTraining(f"stopped after {stop_after_steps} steps")
                tally["seconds"] += time.perf_counter() - t0
                t1 = time.perf_counter()
                dev = self.evaluate("dev")
                entry = {"epoch": state["epoch"],
                         "train_loss": tally["loss"] / tally["batches"] if tally["batches"] else None,
                         "dev_wf1": dev["wf1"], "train_seconds": round(tally["seconds"], 2),
                         "eval_seconds": round(time.perf_counter() - t1, 2)}
                state["history"].append(entry)
                epoch_total = -(-len(batches) // p.grad_accum)
                rate = f", {epoch_total / tally['seconds']:.2f} steps/s" if tally["seconds"] > 0 else ""
                if r.main:
                    log(f"epoch {state['epoch']}: train loss {entry['train_loss']}, dev WF1 {dev['wf1']:.4f} "
                        f"(train {entry['train_seconds']:.0f} s{rate}, dev {entry['eval_seconds']:.0f} s)")
                if dev["wf1"] > state["best"]:
                    state.update(best=dev["wf1"], best_epoch=state["epoch"], since=0)
                    if r.main:
                        self.save("best")
                else:
                    state["since"] += 1
                state["epoch"] += 1
                state["batch"] = 0
                state.pop("epoch_tally")
                checkpoint()
        finally:
            bar.close()
        distributed.barrier(r, f"the end of fine-tune {self.ckpt}")   # rank 0's `best` is written
        state["seconds"] = time.perf_counter() - started
        if r.main:
            atomic_write_text(self.ckpt / "history.json", json.dumps(state["history"], indent=1))
        return state

    def my_share(self, rows: np.ndarray, weight: torch.Tensor | None) -> tuple[np.ndarray, float]:
        """This rank's rows of a global batch (every N-th) and the factor that makes the average of the N ranks'
        losses the loss of the whole batch: N x (this share's CE weight) / (the batch's). A rank left without
        rows (a last batch smaller than N) computes its first row at weight 0, so every rank takes part in the
        gradients' all-reduce."""
        r = self.ranks
        if not r.distributed:
            return rows, 1.0
        mine = rows[r.rank::r.world]
        if not len(mine):
            return rows[:1], 0.0
        w = (weight.cpu().numpy()[self.y[rows]] if weight is not None else np.ones(len(rows)))
        return mine, float(r.world * w[r.rank::r.world].sum() / w.sum())


class TextFinetuner(Finetuner):
    """The text teacher: `TextClassifier` on the manifest's text in the configured input format."""
    kind, modality, store_kind = "hf_text", "text", "finetuned_text"
    p: FinetuneParams

    def setup(self) -> None:
        p = self.p
        self.tokenizer, encoder = load_text_model(p.weights, p.revision, p.input_format, p.speaker_tokens)
        self.gradient_checkpointing(encoder)
        torch.manual_seed(p.seed)
        self.model = TextClassifier(encoder, len(self.labels), p.pooling, self.tokenizer.mask_token_id, p.dropout,
                                    self.d_out())
        self.model.to(self.device)
        rows = np.arange(len(self.manifest))
        pairs = text_inputs(self.manifest, rows, p.input_format, p.context_window, p.speaker_tokens,
                            sep=self.tokenizer.sep_token or "</s>", mask=self.tokenizer.mask_token or "<mask>")
        self.encoded = tokenize_pairs(self.tokenizer, pairs, p.input_format, p.max_length)
        self.lengths = np.array([len(e["input_ids"]) for e in self.encoded], np.int64)

    def data_identity(self):
        rows = self.manifest.rows
        return rows[[c for c in ("utt_id", "text", "label", "split") if c in rows]].to_dict("list")

    def checkpoint_info(self) -> dict:
        info = {"pooling": self.p.pooling, "input_format": self.p.input_format}
        return info if self.objective.name == "ce" else {**info, "objective": self.objective.name}

    def collate(self, rows: np.ndarray) -> dict:
        batch = self.tokenizer.pad([self.encoded[i] for i in rows], return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def save_encoder_extras(self, path: Path) -> None:
        self.tokenizer.save_pretrained(path)


class MediaFinetuner(Finetuner):
    """An audio or video encoder fine-tuned on the media store's decoded media."""
    needs_media = True

    def data_identity(self):
        rows = self.manifest.rows
        return {"media": self.media.attrs["fingerprint"],
                "rows": rows[[c for c in ("utt_id", "label", "split") if c in rows]].to_dict("list")}

    def place(self, encoder_obj, classifier_cls, **kw) -> None:
        """Take the model and processor that the extraction encoder `encoder_obj` loaded (the very path the
        frozen store's encoder takes), wrap the model in `classifier_cls` for training."""
        self.processor = encoder_obj.processor
        backbone = encoder_obj.model
        self.gradient_checkpointing(backbone)
        torch.manual_seed(self.p.seed)
        self.model = classifier_cls(backbone, len(self.labels), dropout=self.p.dropout, d_out=self.d_out(), **kw)
        self.model.to(self.device)

    def save_encoder_extras(self, path: Path) -> None:
        self.processor.save_pretrained(path)


class AudioFinetuner(MediaFinetuner):
    """A speech encoder fine-tuned on the media store's 16 kHz audio (`AudioClassifier`)."""
    kind, modality, store_kind = "hf_audio", "audio", "finetuned_audio"
    p: AudioFinetuneParams

    def setup(self) -> None:
        from pipeline.configs import HFAudioConfig
        from pipeline.encoders.audio import HFAudioEncoder, unusable_audio
        from pipeline.problems import masked_problem

        p = self.p
        enc = HFAudioEncoder("finetune", HFAudioConfig(weights=p.weights, revision=p.revision, device=p.device,
                                                       autocast=p.autocast, max_seconds=p.max_seconds,
                                                       min_seconds=p.min_seconds, silence_dbfs=p.silence_dbfs))
        self.sr = int(self.media.attrs["sample_rate"])
        if self.sr != enc.processor.sampling_rate:
            raise ParamsError(f"finetune ({p.weights}): the model expects {enc.processor.sampling_rate} Hz audio, the "
                              f"media store holds {self.sr} Hz (set decode.sample_rate)")
        self.prepare = enc.prepare   # the hf_audio encoder's own input preparation (normalise, pad, mask)
        self.place(enc, AudioClassifier)
        self.max_samples = int(p.max_seconds * self.sr)
        ids = self.manifest.utt_ids
        ok = self.media.fixed("audio_valid", ids).astype(bool)
        self.lengths = np.zeros(len(ids), np.int64)
        for i, ((_, r), good) in enumerate(zip(self.manifest.rows.iterrows(), ok)):
            reason = "audio masked at decode" if not good else None
            if good:   # what the hf_audio encoder masks, masked here too (read once; not kept in memory)
                x = self.wave(i)
                reason = unusable_audio(x, self.sr, p.min_seconds, p.silence_dbfs)
                self.lengths[i] = len(x)
            if reason:
                self.usable[i] = False
                self.problems.append(masked_problem(r, r.get("audio", ""), reason, "audio"))

    def wave(self, row: int) -> np.ndarray:
        return self.media.audio(self.manifest.utt_ids[row])[: self.max_samples]

    def collate(self, rows: np.ndarray) -> dict:
        inputs = self.prepare([self.wave(i) for i in rows], self.sr)
        return {k: v.to(self.device) for k, v in inputs.items()}


class VideoFinetuner(MediaFinetuner):
    """A video transformer fine-tuned on the media store's frames (`VideoClassifier`)."""
    kind, modality, store_kind = "hf_video", "visual", "finetuned_video"
    p: VideoFinetuneParams

    def setup(self) -> None:
        from pipeline.configs import HFVideoConfig
        from pipeline.encoders.visual import HFVideoEncoder, decoded_video, sample_frames

        p = self.p
        enc = HFVideoEncoder("finetune", HFVideoConfig(weights=p.weights, revision=p.revision, pooling=p.pooling,
                                                       device=p.device, autocast=p.autocast))
        self.num_frames, self.sample_frames = enc.num_frames, sample_frames
        self.place(enc, VideoClassifier, pooling=p.pooling)
        _, valid, self.problems = decoded_video(self.manifest.rows, self.media)
        self.usable = valid.astype(bool)
        self.lengths = np.zeros(len(self.manifest), np.int64)   # every clip is num_frames long

    def collate(self, rows: np.ndarray) -> dict:
        ids = self.manifest.utt_ids
        videos = [list(self.sample_frames(self.media.frames(ids[i]), self.num_frames)) for i in rows]
        return {"pixel_values": self.processor(videos, return_tensors="pt")["pixel_values"].to(self.device)}


FINETUNERS = {c.kind: c for c in (TextFinetuner, AudioFinetuner, VideoFinetuner)}


def build_finetuner(manifest: Manifest, p: FinetuneBase, ckpt_dir: str | Path, media_path: str | Path | None = None,
                    objective=None) -> Finetuner:
    """The fine-tuner of `p.kind` (hf_text | hf_audio | hf_video)."""
    return FINETUNERS[getattr(p, "kind", "hf_text")](manifest, p, ckpt_dir, media_path, objective)


def _first_line(e) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _read_json(f: Path, ckpt: Path):
    try:
        return json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f}: missing or damaged ({_first_line(e)}); {what_to_do(f, delete=ckpt)}") from e


def _read_tensors(f: Path, ckpt: Path, header_only: bool = False) -> dict[str, torch.Tensor] | None:
    """A safetensors file (a pickle, a truncated or damaged file fails here, naming it; nothing runs)."""
    try:
        if header_only:   # safe_open checks the header and that the tensors cover the file exactly
            with safe_open(f, "pt", device="cpu"):
                return None
        return load_file(f, device="cpu")
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({_first_line(e)}); "
                              f"{what_to_do(f, delete=ckpt)}") from e


def _check_tensors(f: Path, ckpt: Path) -> None:
    _read_tensors(f, ckpt, header_only=True)


class TeacherEncoder(Encoder):
    """The fine-tuned text checkpoint as an encoder: `pooled` at the pooling position and `logits`."""
    kind = "finetuned_text"
    modality = "text"
    needs_media = False

    def __init__(self, name: str, tuner: Finetuner, checkpoint: Path, weights_dir: Path | None = None):
        """`checkpoint` as it is recorded (a project path); `weights_dir`: where it is here, when elsewhere."""
        self.name, self.tuner, self.checkpoint = name, tuner, checkpoint
        self.config = tuner.p
        self.ckpt_hash = weights_hash(str(weights_dir or checkpoint))

    @property
    def dim(self) -> int:
        return int(self.tuner.model.classifier.in_features)

    def provenance(self):
        config = params_identity(self.config)   # an option at its neutral value leaves the store's identity as it was
        return {**super().provenance(), "config": config, "config_hash": fingerprint(config),
                "weights": str(self.checkpoint), "weights_hash": self.ckpt_hash,
                "base_weights": self.config.weights, "labels": self.tuner.labels}

    def encode(self, rows, manifest, media=None):
        pooled, logits = self.tuner.predict(rows.index.to_numpy())
        return {"pooled": pooled, "logits": logits, "valid": np.ones(len(rows), bool)}, []


class FinetunedEncoder(TeacherEncoder):
    """An audio / video fine-tune's best checkpoint as an encoder (`finetuned_audio` / `finetuned_video`), or a
    text one trained with another objective than `ce`: `pooled`, `logits`, the inputs it masks and why, and the
    provenance of the base weights, the objective and (a student) its teacher store."""

    def __init__(self, name: str, tuner: Finetuner, checkpoint: Path, weights_dir: Path | None = None):
        super().__init__(name, tuner, checkpoint, weights_dir)
        self.kind, self.modality, self.needs_media = tuner.store_kind, tuner.modality, tuner.needs_media

    def provenance(self):
        base = resolve_weights(self.config.weights)
        return {**super().provenance(), "base_weights_revision": self.config.revision,
                "base_weights_hash": weights_hash(base), "objective": self.tuner.objective.name,
                **self.tuner.objective.provenance()}

    def encode(self, rows, manifest, media=None):
        idx = rows.index.to_numpy()
        pooled, logits = self.tuner.predict(idx)
        mine = set(rows["utt_id"])
        return ({"pooled": pooled, "logits": logits, "valid": self.tuner.usable[idx].copy()},
                [q for q in self.tuner.problems if q["utt_id"] in mine])


def store_encoder(tuner: Finetuner, name: str) -> TeacherEncoder:
    """The encoder that writes `tuner`'s store from its best checkpoint (already loaded)."""
    cls = TeacherEncoder if tuner.kind == "hf_text" and tuner.objective.name == "ce" else FinetunedEncoder
    return cls(name, tuner, tuner.ckpt / "best")


def write_store(tuner: Finetuner, name: str, out_path: str | Path, chunk_size: int = 512) -> dict:
    """Features + logits of the best checkpoint for every utterance (train/dev/test) -> feature store. Under
    torchrun every rank computes its share of the chunks and rank 0 assembles (pipeline/extract.py)."""
    tuner.load("best")
    return extract(tuner.manifest, store_encoder(tuner, name), out_path, tuner.media_path, chunk_size=chunk_size)


write_teacher_store = write_store   # the text teacher's name for it


def finetune_to_store(tuner: Finetuner, name: str, out_path: str | Path, log=print) -> dict:
    """Train (or resume), write the store from the best checkpoint and its summary (`<store>.summary.json`)."""
    state = tuner.train(log=log)
    out = Path(out_path)
    summary = write_store(tuner, name, out)
    dev = tuner.evaluate("dev")
    report = {"best_epoch": state["best_epoch"], "dev_wf1": dev["wf1"], "dev_accuracy": dev["accuracy"],
              "steps": state["step"], "train_seconds": round(state.get("seconds", 0.0), 1),
              "global_batch": tuner.p.batch_size * tuner.ranks.world * tuner.p.grad_accum,
              "processes": tuner.ranks.world, "store": str(out), "history": state["history"]}
    log(f"{name}: best epoch {state['best_epoch']}, dev WF1 {dev['wf1']:.4f} -> {out}")
    summary = {**summary, "finetune": report}
    if tuner.ranks.main:   # beside the store, as extract's summary is
        atomic_write_text(out.with_suffix(".summary.json"), json.dumps(summary, indent=1))
    return summary
