"""Fine-tuning the text teacher once per dataset, then caching its features and logits as a feature store.

The papers' text branch is a fine-tuned encoder (DialogueTRM: BERT on `indi_context`; TelME: RoBERTa on
`prompt`, the teacher its students distil from). `finetune_text` trains `TextClassifier` (encoder + linear
layer on the pooled token) with AdamW, warmup + linear decay, gradient accumulation, optional class
weights, autocast on CUDA and gradient checkpointing, and stops early on dev weighted F1. Then the best
checkpoint writes the teacher store: `pooled` (the feature at the pooling position) and `logits`, for every
split, with the checkpoint's content hash as provenance — same contract as any feature store, so a head
takes it as its text input by naming it in params `features.text`.

On a CPU, `group_by_length: true` batches utterances of similar token length (shuffle; sort by length within
mega-batches of 50 batches; shuffle the batches, the one holding the longest input first so that a batch too
big for memory fails at the first step): far less padding, so shorter epochs (bench/finetune_meld.py). The
batches differ from the plain shuffle's, so results move a little; it is off by default, and off it leaves
the fingerprints of existing checkpoints and teacher stores as they were. A tqdm bar (pipeline/logs.py
`progress`: off outside a terminal) shows the step, the epoch's running loss, steps/s and the ETA; each
epoch's line in the log gives its seconds and steps/s.

Checkpoints (`<ckpt>/best`, `<ckpt>/last`) hold the encoder and tokenizer (with the added speaker tokens)
in transformers' format, the classifier layer, and — in `last` — optimizer, scheduler, RNG state and the
position in the epoch, so an interrupted fine-tune resumes where its last checkpoint left it.

Checkpoints travel through the DVC remote, so they are data and never unpickled (DESIGN.md, "Trust
boundary"). A checkpoint directory, written to `.<name>.tmp` and renamed:
    encoder/                     save_pretrained: config.json, model.safetensors, tokenizer files
    classifier.safetensors       the linear layer's `weight`, `bias`
    training_state.safetensors   (`last` only) optimizer tensors and RNG states, keyed by their path
    training_state.json          (`last` only) counters, history, optimizer param groups, scheduler, numpy and
                                 Python RNG states; a tensor appears as {"__tensor__": "<key>"}
    checkpoint.json              written last: format, format_version, labels, pooling, fingerprint, ...
A directory holding a pickle (`*.pt`, `*.bin`, ...), a damaged or foreign file is refused with a
`CheckpointError` naming the file.
"""
from __future__ import annotations

import json
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from pipeline.configs import FinetuneParams
from pipeline.encoders import Encoder
from pipeline.encoders.text import load_text_model, pool_hidden, text_inputs, tokenize_pairs
from pipeline.extract import extract
from pipeline.logs import progress
from pipeline.manifest import Manifest
from pipeline.metrics import classification_metrics
from pipeline.runtime import autocast_context, resolve_device, weights_hash
from pipeline.store import StoreError, atomic_write_text, fingerprint, guarded_write, remove_path, what_to_do

CHECKPOINT_FORMAT = "ercflow.text_checkpoint"
CHECKPOINT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")   # never read, refused
MEGA_BATCH = 50   # group_by_length: batches per mega-batch sorted by length (as transformers' LengthGroupedSampler)
# options added after checkpoints and teacher stores were first written: at these values they are left out
# of the fingerprints, so an existing checkpoint / store stays valid (resumable, up to date)
NEUTRAL_ADDITIONS = {"group_by_length": False}


def params_identity(p: FinetuneParams) -> dict:
    """The fine-tune params as they enter fingerprints and the teacher store's `config`."""
    return {k: v for k, v in asdict(p).items() if not (k in NEUTRAL_ADDITIONS and v == NEUTRAL_ADDITIONS[k])}


def length_grouped_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int,
                           rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of `rows` (already shuffled) of similar `lengths[row]`: each mega-batch of MEGA_BATCH
    batches is sorted by length, longest first, and cut into batches; the batches are shuffled, and the
    one with the longest input goes first (a batch too big for memory fails at once, not hours later)."""
    mega = MEGA_BATCH * batch_size
    batches = []
    for s in range(0, len(rows), mega):
        group = rows[s:s + mega]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if batches:
        first = int(np.argmax([lengths[b].max() for b in batches]))
        batches.insert(0, batches.pop(first))
    return batches


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


class TextClassifier(nn.Module):
    """Encoder + dropout + linear layer on the pooled token (the feature the teacher store keeps)."""

    def __init__(self, encoder, n_labels: int, pooling: str, mask_token_id: int | None, dropout: float):
        super().__init__()
        self.encoder, self.pooling, self.mask_token_id = encoder, pooling, mask_token_id
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, n_labels)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(**batch).last_hidden_state
        pooled = pool_hidden(hidden, batch, self.pooling, self.mask_token_id)
        return pooled, self.classifier(self.dropout(pooled))


class InterruptTraining(Exception):
    """Raised by a `stop_after_steps` hook (tests simulate a kill with it)."""


class CheckpointError(StoreError):
    """A fine-tune checkpoint that is damaged, foreign, pickled or of a newer format (names the file)."""


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


class TextFinetuner:
    def __init__(self, manifest: Manifest, p: FinetuneParams, ckpt_dir: str | Path):
        self.manifest, self.p, self.ckpt = manifest, p, Path(ckpt_dir)
        self.labels = manifest.meta.labels
        if not self.labels:
            raise ValueError("finetune_text needs categorical labels")
        self.device = resolve_device(p.device)
        self.fingerprint = fingerprint({"params": params_identity(p), "labels": self.labels,
                                        "data": manifest.rows[[c for c in ("utt_id", "text", "label", "split")
                                                               if c in manifest.rows]].to_dict("list")})
        self.tokenizer, encoder = load_text_model(p.weights, p.revision, p.input_format, p.speaker_tokens)
        if p.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
        torch.manual_seed(p.seed)
        self.model = TextClassifier(encoder, len(self.labels), p.pooling, self.tokenizer.mask_token_id, p.dropout)
        self.model.to(self.device)
        rows = np.arange(len(manifest))
        pairs = text_inputs(manifest, rows, p.input_format, p.context_window, p.speaker_tokens,
                            sep=self.tokenizer.sep_token or "</s>", mask=self.tokenizer.mask_token or "<mask>")
        self.encoded = tokenize_pairs(self.tokenizer, pairs, p.input_format, p.max_length)
        self.lengths = np.array([len(e["input_ids"]) for e in self.encoded], np.int64)
        self.y = manifest.label_index()
        split = manifest.rows["split"].to_numpy()
        self.rows = {s: rows[(split == s) & (self.y >= 0)] for s in ("train", "dev", "test")}

    # -- batches ----------------------------------------------------------------------------------
    def collate(self, rows: np.ndarray) -> dict:
        batch = self.tokenizer.pad([self.encoded[i] for i in rows], return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The train batches of `epoch`: a function of the seed and the epoch alone, so a resumed run meets
        the very batches the interrupted one would have."""
        rng = np.random.default_rng(self.p.seed + epoch)
        order, bs = rng.permutation(self.rows["train"]), self.p.batch_size
        if self.p.group_by_length:
            return length_grouped_batches(order, self.lengths, bs, rng)
        return [order[s:s + bs] for s in range(0, len(order), bs)]

    @torch.inference_mode()
    def predict(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pooled features, logits) of `rows`, in length-sorted batches, returned in `rows` order."""
        self.model.eval()
        d = self.model.encoder.config.hidden_size
        pooled, logits = np.zeros((len(rows), d), np.float32), np.zeros((len(rows), len(self.labels)), np.float32)
        order = np.argsort(self.lengths[rows], kind="stable")
        for s in range(0, len(order), self.p.eval_batch_size):
            idx = order[s:s + self.p.eval_batch_size]
            with autocast_context(self.device, self.p.autocast):
                f, z = self.model(self.collate(rows[idx]))
            pooled[idx], logits[idx] = f.float().cpu().numpy(), z.float().cpu().numpy()
        return pooled, logits

    def evaluate(self, split: str) -> dict:
        _, logits = self.predict(self.rows[split])
        return classification_metrics(self.y[self.rows[split]], logits.argmax(1), self.labels)

    # -- checkpoints ------------------------------------------------------------------------------
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
                self.tokenizer.save_pretrained(tmp / "encoder")
            pickled = [f.name for f in (tmp / "encoder").iterdir() if f.name.endswith(PICKLE_SUFFIXES)]
            if pickled or not any((tmp / "encoder").glob("*.safetensors")):
                raise CheckpointError(f"{tmp / 'encoder'}: save_pretrained wrote {pickled or 'no safetensors'}; "
                                      "ercflow keeps checkpoints in safetensors only")
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.classifier.state_dict().items()},
                      tmp / "classifier.safetensors")
            if state is not None:
                tensors: dict[str, torch.Tensor] = {}
                doc = _split_tensors(state, "state", tensors)
                save_file(tensors, tmp / "training_state.safetensors")
                (tmp / "training_state.json").write_text(json.dumps(doc))
            meta = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "labels": self.labels,
                    "pooling": self.p.pooling, "input_format": self.p.input_format,
                    "base_weights": self.p.weights, "fingerprint": self.fingerprint,
                    "training_state": state is not None}
            (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=1))   # last: marks a complete dir
            remove_path(old)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            remove_path(old)
        return final

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
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path / 'checkpoint.json'}: not an ercflow fine-tune checkpoint (format "
                                  f"{meta.get('format') if isinstance(meta, dict) else None!r}); "
                                  f"{what_to_do(path / 'checkpoint.json', delete=path)}")
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
        self.model.encoder.load_state_dict(encoder.state_dict())
        head = _read_tensors(path / "classifier.safetensors", path)
        try:
            self.model.classifier.load_state_dict(head)
        except RuntimeError as e:
            raise CheckpointError(f"{path / 'classifier.safetensors'}: does not fit the classifier "
                                  f"({_first_line(e)}); {what_to_do(path, delete=path)}") from e
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

    # -- training ---------------------------------------------------------------------------------
    def train(self, log=print, stop_after_steps: int | None = None) -> dict:
        from transformers import get_linear_schedule_with_warmup

        p = self.p
        self.ckpt.mkdir(parents=True, exist_ok=True)
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
        groups = [{"params": [w for n, w in self.model.named_parameters() if not n.endswith(no_decay)],
                   "weight_decay": p.weight_decay},
                  {"params": [w for n, w in self.model.named_parameters() if n.endswith(no_decay)],
                   "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=p.lr)
        steps_per_epoch = -(-len(self.rows["train"]) // (p.batch_size * p.grad_accum))
        sched = get_linear_schedule_with_warmup(opt, min(p.warmup_steps, p.epochs * steps_per_epoch // 2),
                                                p.epochs * steps_per_epoch)
        weight = None
        if p.class_weights:
            counts = np.bincount(self.y[self.rows["train"]], minlength=len(self.labels)).astype(np.float64)
            weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32,
                                  device=self.device)
        state = {"epoch": 0, "batch": 0, "step": 0, "best": -1.0, "best_epoch": -1, "since": 0, "history": []}
        if self.resumable():
            saved = self.load("last")
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            set_rng_states(saved["rng"])
            state = saved["state"]
            log(f"resuming from {self.ckpt / 'last'}: epoch {state['epoch']}, batch {state['batch']}, step {state['step']}")
        resumed_at = state["step"]

        def checkpoint():
            self.save("last", {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "rng": rng_states(), "state": state})

        started = time.perf_counter()
        bar = progress(total=p.epochs * steps_per_epoch, initial=state["step"], desc=f"fine-tune {self.ckpt.name}",
                       unit="step", dynamic_ncols=True)
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
                    batch = self.collate(batches[b])
                    with autocast_context(self.device, p.autocast):
                        _, logits = self.model(batch)
                    loss = F.cross_entropy(logits.float(), torch.from_numpy(self.y[batches[b]]).to(self.device),
                                           weight=weight)
                    (loss / p.grad_accum).backward()
                    tally["loss"] += float(loss.detach())
                    tally["batches"] += 1
                    state["batch"] = b + 1
                    if (b + 1) % p.grad_accum == 0 or b + 1 == len(batches):
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
                log(f"epoch {state['epoch']}: train loss {entry['train_loss']}, dev WF1 {dev['wf1']:.4f} "
                    f"(train {entry['train_seconds']:.0f} s{rate}, dev {entry['eval_seconds']:.0f} s)")
                if dev["wf1"] > state["best"]:
                    state.update(best=dev["wf1"], best_epoch=state["epoch"], since=0)
                    self.save("best")
                else:
                    state["since"] += 1
                state["epoch"] += 1
                state["batch"] = 0
                state.pop("epoch_tally")
                checkpoint()
        finally:
            bar.close()
        state["seconds"] = time.perf_counter() - started
        atomic_write_text(self.ckpt / "history.json", json.dumps(state["history"], indent=1))
        return state


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
    """The fine-tuned checkpoint as an encoder: `pooled` at the pooling position and `logits`."""
    kind = "finetuned_text"
    modality = "text"
    needs_media = False

    def __init__(self, name: str, tuner: TextFinetuner, checkpoint: Path, weights_dir: Path | None = None):
        """`checkpoint` as it is recorded (a project path); `weights_dir`: where it is here, when elsewhere."""
        self.name, self.tuner, self.checkpoint = name, tuner, checkpoint
        self.config = tuner.p
        self.ckpt_hash = weights_hash(str(weights_dir or checkpoint))

    @property
    def dim(self) -> int:
        return int(self.tuner.model.encoder.config.hidden_size)

    def provenance(self):
        config = params_identity(self.config)   # an option at its neutral value leaves the store's identity as it was
        return {**super().provenance(), "config": config, "config_hash": fingerprint(config),
                "weights": str(self.checkpoint), "weights_hash": self.ckpt_hash,
                "base_weights": self.config.weights, "labels": self.tuner.labels}

    def encode(self, rows, manifest, media=None):
        pooled, logits = self.tuner.predict(rows.index.to_numpy())
        return {"pooled": pooled, "logits": logits, "valid": np.ones(len(rows), bool)}, []


def write_teacher_store(tuner: TextFinetuner, name: str, out_path: str | Path, chunk_size: int = 512) -> dict:
    """Features + logits of the best checkpoint for every utterance (train/dev/test) -> feature store."""
    tuner.load("best")
    return extract(tuner.manifest, TeacherEncoder(name, tuner, tuner.ckpt / "best"), out_path, chunk_size=chunk_size)
