"""A trained head on disk: one `.safetensors` file, tensors + JSON metadata, no pickle.

Head bundles travel through the DVC remote, so they are data (docs/security.md): the tensors are
the head's state_dict, and the safetensors header's metadata holds one key, `ercflow`, whose value is a JSON
object:
    format          "ercflow.head"
    format_version  1 (a newer version is refused: upgrade ercflow)
    head            registry name (`late_fusion`, `dialoguetrm`, `telme`, `matav`)
    options         the head's options as in params.yaml
    task            categorical | dimensional
    modalities      e.g. ["text", "audio", "visual"]
    dims            input size per modality, n_out: output size (what `build_head` needs); a modality whose
                    store kept several layers has its LayerMix in the tensors (`mixers.<m>.logits` [L]), which
                    gives its number of layers back
    labels          class names (categorical), dimensions: names of the dimensional targets
    features        per modality, the recipe of its training store (`store_recipe`): encoder name, kind and
                    full config, weights and their content hash (a teacher: its checkpoint), and for audio/visual
                    encoders the decode config of the media they read — what `ercflow predict` rebuilds
    normalization   per modality, the train split's feature mean and std the head was trained with ([D], or
                    [L, D] for a several-layer store)
    layer_weights   per layered modality, the learned softmax weight of each layer (for people; not read back)
    tensors_blake2b the checksum of the tensors (names, dtypes, shapes, bytes; `tensors_checksum`), verified on
                    every load: a damaged bundle is refused, never run (a bundle without it, from an older
                    ercflow, loads with a warning)
plus whatever else the writer adds (dataset, params name, best epoch). A truncated, foreign or pickled file
is a `BundleError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from heads import ERCHead
from heads.registry import build_head
from pipeline.errors import first_line
from pipeline.store import FeatureStore, MediaStore, StoreError, guarded_write, what_to_do

log = logging.getLogger(__name__)

FORMAT = "ercflow.head"
FORMAT_VERSION = 1
REQUIRED = ("head", "options", "task", "modalities", "dims", "n_out")


class BundleError(StoreError):
    """A head bundle that is damaged, foreign, pickled or of a newer format (names the file)."""


NOT_RECIPE = ("dataset", "inputs", "rows", "checksums")   # store attributes about the training data, not the encoder


def store_recipe(store_path: str | Path, media_path: str | Path | None) -> dict:
    """How to compute a store like `store_path` on new data: its provenance, plus the decode config of the
    media store that an audio or visual encoder read."""
    with FeatureStore(store_path) as store:
        recipe = {k: v for k, v in store.attrs.items() if k not in NOT_RECIPE}
    if recipe.get("modality") in ("audio", "visual") and media_path is not None:
        with MediaStore(media_path) as media:
            recipe["decode_config"] = media.attrs["decode_config"]
    return recipe


CHECKSUM = "tensors_blake2b"


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """blake2b over each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_head(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `state_dict` and `meta` (JSON-able; needs REQUIRED keys) to `path` atomically."""
    path = Path(path)
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"save_head({path}): meta lacks {missing}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"save_head({path}): state_dict entries that are not tensors: {bad}")
    # a copy per tensor: safetensors refuses tensors sharing storage (tied weights), load_state_dict re-ties
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    try:   # now, not after the file is written: a value JSON cannot hold names its key
        header = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **meta,
                             CHECKSUM: tensors_checksum(tensors)})
    except (TypeError, ValueError) as e:
        raise BundleError(f"{path}: the bundle's metadata cannot be written as JSON ({first_line(e)})") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with guarded_write(path, tmp, sum(t.numel() * t.element_size() for t in tensors.values()), "re-run the stage"):
        save_file(tensors, tmp, metadata={"ercflow": header})
        os.replace(tmp, path)
    return path


def load_head(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of a bundle written by `save_head`; nothing in the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"head bundle not found: {path}")
    try:
        with safe_open(path, "pt", device="cpu") as f:
            header = (f.metadata() or {}).get("ercflow")
        state = load_file(path, device="cpu")
    except (OSError, SafetensorError, ValueError) as e:
        raise BundleError(f"{path}: not a readable safetensors file ({first_line(e)}; a pickled `.pt` or a "
                          f"truncated file reads like this); {what_to_do(path)}") from e
    if header is None:
        raise BundleError(f"{path}: not an ercflow head bundle (no `ercflow` metadata in its header); "
                          f"{what_to_do(path)}")
    try:
        meta = json.loads(header)
    except ValueError as e:
        raise BundleError(f"{path}: damaged `ercflow` metadata ({first_line(e)}); {what_to_do(path)}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{path}: not an ercflow head bundle (format "
                          f"{meta.get('format') if isinstance(meta, dict) else None!r}); {what_to_do(path)}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version!r}, this ercflow reads up to {FORMAT_VERSION}: "
                          "upgrade ercflow, or re-run the train stage with this one")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise BundleError(f"{path}: the `ercflow` metadata lacks {missing}; {what_to_do(path)}")
    recorded = meta.get(CHECKSUM)
    if recorded is None:
        log.warning("%s: no `%s` (written by an older ercflow): its tensors cannot be verified", path, CHECKSUM)
    elif recorded != tensors_checksum(state):
        raise BundleError(f"{path}: damaged bundle: its tensors do not match the checksum recorded when it was "
                          f"written; {what_to_do(path)}")
    return state, meta


def bundle_dims(meta: dict, state: dict[str, torch.Tensor]) -> dict[str, int | tuple[int, int]]:
    """`build_head`'s input sizes: the metadata's D per modality, as (layers, D) where the tensors hold a
    LayerMix of that many layers for it."""
    out = {}
    for m, d in meta["dims"].items():
        d = int(d[-1]) if isinstance(d, list) else int(d)
        mix = state.get(f"mixers.{m}.logits")
        out[m] = (int(mix.shape[0]), d) if mix is not None else d
    return out


def load_trained_head(path: str | Path) -> ERCHead:
    """The head of a bundle, built from its metadata with its weights loaded (strict), in eval mode."""
    state, meta = load_head(path)
    try:
        head = build_head(meta["head"], bundle_dims(meta, state), int(meta["n_out"]), meta["task"], meta["options"])
        head.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise BundleError(f"{path}: the weights do not fit head '{meta['head']}' built from its metadata "
                          f"({first_line(e)}); {what_to_do(path)}") from e
    return head.eval()
