"""The fine-tune checkpoint format: safetensors + JSON, never a pickle.

Checkpoints travel through the DVC remote, so they are data and never unpickled. A checkpoint directory
(`<ckpt>/best`, `<ckpt>/last`), written to `.<name>.tmp` and renamed:
    encoder/                     save_pretrained: config.json, model.safetensors, tokenizer / processor files
                                 (a LoRA fine-tune: adapter_config.json, adapter_model.safetensors and the
                                 tokenizer / processor only; checkpoint.json has the base's `base_weights_hash`)
    classifier.safetensors       the linear layer's `weight`, `bias`
    projection.safetensors       (a student projected to its teacher's size) `weight`, `bias`
    training_state.safetensors   (`last` only) optimizer tensors and RNG states, keyed by their path
    training_state.json          (`last` only) counters, history, optimizer param groups, scheduler, numpy and
                                 Python RNG states; a tensor appears as {"__tensor__": "<key>"}
    checkpoint.json              written last: format, format_version, labels, fingerprint, ...
A directory holding a pickle (`*.pt`, `*.bin`, ...), a damaged or foreign file, a checkpoint of another kind or
of a newer format is refused with a `CheckpointError` naming the file; the encoder loads with safetensors only
and without remote code.
"""
from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import PICKLE_SUFFIXES, first_line, pickled_files
from pipeline.finetune.lora import ADAPTER_CONFIG, is_adapted, load_adapter
from pipeline.store import StoreError, guarded_write, remove_path, what_to_do

# checkpoint.json `format` per kind (a checkpoint of another kind is refused, naming both)
CHECKPOINT_FORMATS = {"hf_text": "ercflow.text_checkpoint", "hf_audio": "ercflow.audio_checkpoint",
                      "hf_video": "ercflow.video_checkpoint"}
CHECKPOINT_VERSION = 1


class CheckpointError(StoreError):
    """A fine-tune checkpoint that is damaged, foreign, pickled or of a newer format (names the file)."""


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


# -- the training state: tensors apart, the rest as JSON ---------------------------------------------------

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
    """Restore what `rng_states` returned (a resumed run draws what the interrupted one would have)."""
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


# -- reading files, every failure a CheckpointError naming the file ---------------------------------------

def _read_json(f: Path, ckpt: Path):
    try:
        return json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f}: missing or damaged ({first_line(e)}); {what_to_do(f, delete=ckpt)}") from e


def _read_tensors(f: Path, ckpt: Path, header_only: bool = False) -> dict[str, torch.Tensor] | None:
    """A safetensors file (a pickle, a truncated or damaged file fails here, naming it; nothing runs)."""
    try:
        if header_only:   # safe_open checks the header and that the tensors cover the file exactly
            with safe_open(f, "pt", device="cpu"):
                return None
        return load_file(f, device="cpu")
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({first_line(e)}); "
                              f"{what_to_do(f, delete=ckpt)}") from e


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


# -- save, verify, load ---------------------------------------------------------------------------------

def save_checkpoint(final: Path, model: nn.Module, kind: str, info: dict, state: dict | None,
                    save_encoder_extras: Callable[[Path], None]) -> Path:
    """Write `model` (a `Classifier`) as checkpoint directory `final`, atomically (a temp dir, then renamed):
    checkpoint.json holds the format of `kind`, `info` (labels, fingerprint, ...) and whether `state` is kept.
    `state` (the training state of `last`) may hold tensors, JSON-able values and dicts keyed by ints (an
    optimizer's state_dict); `save_encoder_extras(dir)` saves the tokenizer or processor beside the encoder."""
    tmp, old = final.parent / f".{final.name}.tmp", final.parent / f".{final.name}.old"
    remove_path(tmp)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with guarded_write(final, tmp, nbytes, "re-run: the fine-tune resumes from its last checkpoint"):
        tmp.mkdir(parents=True)
        with no_transformers_bars():
            model.encoder.save_pretrained(tmp / "encoder", safe_serialization=True)
            save_encoder_extras(tmp / "encoder")
        pickled = pickled_files(tmp / "encoder")
        if pickled or not any((tmp / "encoder").glob("*.safetensors")):
            raise CheckpointError(f"{tmp / 'encoder'}: save_pretrained wrote {pickled or 'no safetensors'}; "
                                  "ercflow keeps checkpoints in safetensors only")
        if model.classifier is not None:   # (an LLM scoring its label words has no classifier layer)
            save_file(_module_tensors(model.classifier), tmp / "classifier.safetensors")
        if model.projection is not None:
            save_file(_module_tensors(model.projection), tmp / "projection.safetensors")
        if state is not None:
            tensors: dict[str, torch.Tensor] = {}
            doc = _split_tensors(state, "state", tensors)
            save_file(tensors, tmp / "training_state.safetensors")
            (tmp / "training_state.json").write_text(json.dumps(doc))
        meta = {"format": CHECKPOINT_FORMATS[kind], "format_version": CHECKPOINT_VERSION, **info,
                "training_state": state is not None}
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=1))   # last: marks a complete dir
        remove_path(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        remove_path(old)
    return final


def read_checkpoint_meta(path: Path, kind: str) -> dict:
    """`checkpoint.json` of the checkpoint directory `path`, after refusing a directory that holds a pickle,
    a foreign checkpoint, one of another kind than `kind` or of a newer format."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    for f in sorted(path.rglob("*")):
        if f.name.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(
                f"{f}: refused: a pickle file in a fine-tune checkpoint (unpickling can run code; ercflow "
                f"reads checkpoints as safetensors + JSON only); {what_to_do(f, delete=path)}")
    meta = _read_json(path / "checkpoint.json", path)
    want = CHECKPOINT_FORMATS[kind]
    if not isinstance(meta, dict) or meta.get("format") != want:
        got = meta.get("format") if isinstance(meta, dict) else None
        what = ("a checkpoint of another kind" if got in CHECKPOINT_FORMATS.values()
                else "not an ercflow fine-tune checkpoint")
        raise CheckpointError(f"{path / 'checkpoint.json'}: {what} (format {got!r}, this {kind} fine-tune "
                              f"reads {want!r}); {what_to_do(path / 'checkpoint.json', delete=path)}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path / 'checkpoint.json'}: format_version {version!r}, this ercflow reads up to "
                              f"{CHECKPOINT_VERSION}: upgrade ercflow, or delete {path} and re-run the stage")
    return meta


def load_checkpoint(path: Path, model: nn.Module, kind: str, labels: list[str], lora=None,
                    base_hash: str | None = None) -> dict | None:
    """Load checkpoint directory `path` (verified as `read_checkpoint_meta` does, trained on `labels`) into
    `model`; returns its training state (None for a checkpoint without one, `best`). A LoRA fine-tune's model
    (`lora`: its params) loads the adapter alone, on base weights of content hash `base_hash`
    (pipeline/finetune/lora.py)."""
    meta = read_checkpoint_meta(path, kind)
    if meta.get("labels") != labels:
        raise CheckpointError(f"{path / 'checkpoint.json'}: labels {meta.get('labels')} differ from the "
                              f"manifest's {labels}; {what_to_do(path, delete=path)}")
    enc = path / "encoder"
    if is_adapted(model.encoder) or (enc / ADAPTER_CONFIG).exists():
        if not is_adapted(model.encoder):
            raise CheckpointError(f"{enc}: holds a LoRA adapter, and this fine-tune trains every weight (its params "
                                  f"have no lora); {what_to_do(path, delete=path)}")
        load_adapter(enc, model.encoder, lora, path, meta.get("base_weights_hash"), base_hash)
    else:
        _load_encoder(path, enc, model)
    return _load_rest(path, model, meta)


def _load_encoder(path: Path, enc: Path, model: nn.Module) -> None:
    """A full fine-tune's encoder, saved whole by save_pretrained."""
    from transformers import AutoModel

    for f in sorted(enc.glob("*.safetensors")):   # name a damaged file before transformers reads it
        _read_tensors(f, path, header_only=True)
    try:   # safetensors only; a config asking for remote code is refused (trust_remote_code stays off)
        with no_transformers_bars():
            encoder, info = AutoModel.from_pretrained(enc, use_safetensors=True, trust_remote_code=False,
                                                      output_loading_info=True)
    except Exception as e:   # noqa: BLE001  (transformers raises OSError, ValueError, SafetensorError, ...)
        raise CheckpointError(f"{enc}: the encoder does not load ({first_line(e)}); "
                              f"{what_to_do(enc, delete=path)}") from e
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"{enc}: the encoder's weights do not fit its config ({first_line(bad)}); "
                              f"{what_to_do(enc, delete=path)}")
    try:
        model.encoder.load_state_dict(encoder.state_dict())
    except RuntimeError as e:
        raise CheckpointError(f"{enc}: does not fit this fine-tune's encoder ({first_line(e)}); "
                              f"{what_to_do(path, delete=path)}") from e


def _load_rest(path: Path, model: nn.Module, meta: dict) -> dict | None:
    """The classifier (and projection) layers, and the training state."""
    parts = [("classifier", model.classifier)] if model.classifier is not None else []
    if model.projection is not None or (path / "projection.safetensors").exists():
        parts.append(("projection", model.projection))
    for part, module in parts:
        f = path / f"{part}.safetensors"
        tensors = _read_tensors(f, path)
        try:
            if module is None:
                raise RuntimeError("this fine-tune has no projection (its student and teacher sizes agree)")
            module.load_state_dict(tensors)
        except RuntimeError as e:
            raise CheckpointError(f"{f}: does not fit the {part} ({first_line(e)}); "
                                  f"{what_to_do(path, delete=path)}") from e
    if not meta.get("training_state"):
        return None
    tensors = _read_tensors(path / "training_state.safetensors", path)
    doc = _read_json(path / "training_state.json", path)
    try:
        return _join_tensors(doc, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'training_state.json'}: does not match training_state.safetensors "
                              f"({first_line(e)}); {what_to_do(path, delete=path)}") from e
