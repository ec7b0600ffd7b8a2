"""How models run: device, precision, int8 quantisation, the weights' content hash, and OOM-safe batching
with inputs prepared in DataLoader workers. Shared by every encoder, fine-tuning and the heads' trainer."""
from __future__ import annotations

import gc
import hashlib
import importlib.util
import inspect
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.configs import bitsandbytes_problem
from pipeline.errors import pickled_files
from pipeline.vocab import ParamsError
from pipeline.store import MediaStore


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_weights(weights: str) -> str:
    """A hub id, a local directory, or `package:<module>/<subdir>` for weights a Python package ships."""
    if weights.startswith("package:"):
        module, _, sub = weights[len("package:"):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"weights {weights!r}: Python package '{module}' is not installed")
        return str(Path(list(spec.submodule_search_locations)[0]) / sub)
    return weights


class PickledWeights(ParamsError):
    """A local weights folder whose model weights are pickled (pytorch_model.bin, ...): never loaded."""


def safetensors_only(path: str) -> dict:
    """`from_pretrained`'s arguments that load safetensors weights only (`use_safetensors=True`); a local
    folder with pickled weight files and no `.safetensors` is refused, naming the file (unpickling runs code)."""
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.safetensors")):
        pickled = pickled_files(p)
        if pickled:
            raise PickledWeights(f"{p / pickled[0]}: pickled weights (ercflow loads safetensors only, since unpickling "
                                 "can run code); convert them to model.safetensors where they come from, e.g. "
                                 "`model.save_pretrained(folder, safe_serialization=True)`")
    return {"use_safetensors": True}


def compute_precision(device: torch.device, autocast: str, quantize: str, where: str) -> str:
    """What the model computes in: `autocast` (bf16 | fp16 | none) applies on CUDA, `quantize` (int8 | none)
    on the CPU; recorded in the store, since it changes the features."""
    if autocast not in ("bf16", "fp16", "none"):
        raise ParamsError(f"{where}.autocast: one of bf16, fp16, none, not {autocast!r}")
    if quantize not in ("int8", "none") + BNB_QUANTIZE:
        raise ParamsError(f"{where}.quantize: one of int8, {', '.join(BNB_QUANTIZE)}, none, not {quantize!r}")
    if quantize in BNB_QUANTIZE:
        if problem := bitsandbytes_problem(quantize, str(device)):
            raise ParamsError(f"{where}.{problem}")
        return f"{quantize}-bnb-{autocast if autocast != 'none' else 'float32'}"
    if device.type == "cuda":
        return f"{autocast}-autocast" if autocast != "none" else "float32"
    return "int8-dynamic" if quantize == "int8" and device.type == "cpu" else "float32"   # fbgemm: CPU only


# weights quantised at load time through bitsandbytes, on CUDA only: 4-bit NF4 (QLoRA, arXiv:2305.14314) and
# LLM.int8() (arXiv:2208.07339); `int8` is torch's dynamic int8 on a CPU (quantize_linear_int8)
BNB_QUANTIZE = ("nf4", "int8_bnb")


def bitsandbytes_config(quantize: str, autocast: str):
    """transformers' BitsAndBytesConfig of `quantize` (nf4 | int8_bnb), computing in the autocast dtype."""
    from transformers import BitsAndBytesConfig

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast, torch.float32)
    if quantize == "nf4":   # QLoRA's recipe: NF4 weights, double quantisation of the scales
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


_SOURCE: dict[type, str] = {}


def _class_source(cls: type) -> str:
    if cls not in _SOURCE:
        parts = []
        for c in cls.__mro__:
            if c.__module__.startswith("torch.nn") or c is object:
                continue
            try:
                parts.append(inspect.getsource(c))
            except (OSError, TypeError):
                parts.append("<no source>")
        _SOURCE[cls] = "\n".join(parts)
    return _SOURCE[cls]


def quantize_linear_int8(model: torch.nn.Module) -> list[str]:
    """Swap the model's nn.Linear layers for dynamically quantized int8 ones (weights int8, activations
    quantized per batch; fbgemm/x86 kernels), in place; returns the swapped layers' names.

    A quantized Linear has no `.weight` tensor, so a layer whose parent (or any ancestor) reads
    `.<name>.weight` / `.<name>.bias` itself stays float32 — e.g. WavLM's attention, which hands its
    projections' weights to F.multi_head_attention_forward. A parent without readable source is kept too."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    modules = dict(model.named_modules())
    chosen = []
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        ancestors = [modules[".".join(parts[:k])] for k in range(len(parts))]
        touched = any(re.search(rf"\.{re.escape(parts[-1])}\.(weight|bias)\b", _class_source(type(a)))
                      or "<no source>" in _class_source(type(a)) for a in ancestors)
        if not touched:
            chosen.append(name)
    with warnings.catch_warnings():
        # torch marks its quantized tensor types as deprecated; they are still the CPU int8 GEMM path
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        quantize_dynamic(model, {n: default_dynamic_qconfig for n in chosen}, inplace=True)
    return chosen


def weights_hash(path: str) -> str | None:
    """Content hash of a local weights directory or file (None for a hub id: its revision is recorded)."""
    p = Path(path)
    if not p.exists():
        return None
    files = sorted(x for x in ([p] if p.is_file() else p.rglob("*")) if x.is_file() and ".cache" not in x.parts)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def autocast_context(device: torch.device, autocast: str):
    """bf16/fp16 autocast on CUDA; a no-op elsewhere."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
    return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype is not None)


class _PreparedBatches(torch.utils.data.Dataset):
    def __init__(self, batches: list[np.ndarray], prepare):
        self.batches, self.prepare = batches, prepare

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return i, self.prepare(self.batches[i])


def clip_batch_size(setting: int, device: torch.device) -> int:
    """0 (auto): 8 audio/video clips per batch on CUDA, 1 on a CPU, where one clip already keeps every core
    busy and padded batches run slower than single clips."""
    return setting or (8 if device.type == "cuda" else 1)


def prep_workers(setting: int, device: torch.device) -> int:
    """-1 (auto): 2 DataLoader workers on CUDA, none on a CPU (where they would compete with the model)."""
    return (2 if device.type == "cuda" else 0) if setting < 0 else setting


def _prepared_in_workers(batches: list[np.ndarray], prepare, workers: int, pin_memory: bool):
    """(rows, prepare(rows)) per batch, prepared in `workers` forked DataLoader processes."""
    # Collected here, before the fork: garbage whose finaliser joins threads of this process (PyAV's resampler
    # graphs, left in reference cycles by decoding) would otherwise be collected in a worker, where those
    # threads do not exist, and wait for them forever (the suite hung so once; tests/test_encoders.py)
    gc.collect()
    loader = torch.utils.data.DataLoader(_PreparedBatches(batches, prepare), batch_size=None,
                                         num_workers=workers, pin_memory=pin_memory)
    for i, x in loader:
        yield batches[i], x


def batched_with_oom_retry(order: np.ndarray, batch_size: int, run, prepare=None, workers: int = 0,
                           pin_memory: bool = False) -> None:
    """Run the model over consecutive batches of `order`.

    Without `prepare`: `run(rows)`. With it: `run(rows, prepare(rows))`, where `prepare` (reading and
    processing inputs) runs in `workers` DataLoader processes ahead of the model, into pinned memory when
    asked. A batch that runs out of GPU memory is split in two and retried (down to single items) instead of
    failing the extraction."""
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    call = run if prepare is not None else (lambda rows, _: run(rows))
    if prepare is None:
        stream = ((b, None) for b in batches)
    elif workers > 0:
        stream = _prepared_in_workers(batches, prepare, workers, pin_memory)
    else:
        stream = ((b, prepare(b)) for b in batches)

    def attempt(rows, prepared):
        try:
            call(rows, prepared)
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(rows) // 2
            for part in (rows[:half], rows[half:]):
                attempt(part, prepare(part) if prepare is not None else None)

    for rows, prepared in stream:
        attempt(rows, prepared)


_WORKER_MEDIA: dict[tuple[int, str], MediaStore] = {}


def worker_media(path: str | Path) -> MediaStore:
    """This process's own handle on a media store (an HDF5 handle must not cross a fork)."""
    key = (os.getpid(), str(path))
    if key not in _WORKER_MEDIA:
        _WORKER_MEDIA[key] = MediaStore(path, verify=False)   # the parent verified it
    return _WORKER_MEDIA[key]
