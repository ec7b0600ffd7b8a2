"""ONNX Runtime for the transformers encoders on a CPU: `runtime: onnx` of `hf_text`, `hf_audio`, `hf_video`
(issue #12, section 4; measured by bench/onnx_cpu.py: 2.5-3.8x the PyTorch float32 pipeline, cosine 1.00000).

`OnnxModel` stands in for the encoder's transformers model: it is called with the keyword inputs the encoder
passes the model (`input_ids`/`attention_mask`/..., `input_values`, `pixel_values`; `output_hidden_states=True`
when several layers are kept) and returns `.last_hidden_state` (and `.hidden_states`) as float32 tensors; any
other attribute (`config`, helpers such as `_get_feature_vector_attention_mask`) is the wrapped model's.

The graph is exported lazily, on the first call, from that call's inputs, with `torch.onnx.export` (the
TorchScript exporter: `dynamo=False`, opset 17). Dim 0 of every input is dynamic (batch) and so is dim 1 of
2-D inputs (tokens, audio samples); the other dims (frames, channels, pixels) are fixed by the model's
processor and stay static: their sizes are part of the cache key, so another size exports another graph.
Text models must run with eager attention: SDPA's mask code traces to the example's padding shape and gives
wrong states for other shapes (`ensure_eager`).

Graphs are cached in `$ERCFLOW_ONNX_CACHE` (default ~/.cache/ercflow/onnx), one folder per key: a hash of the
weights (id, revision, content hash: pipeline/runtime.py `weights_hash`), the model's class and config, the
inputs (names, dtypes, static dims), whether hidden states are outputs, the opset and the torch/transformers
versions. The folder holds `model.onnx` (plus external tensor files for a model over 2 GB) and `graph.json`,
the sha256 of each of them; a folder whose files do not match it is exported again (never trusted). A folder is
written under a temp name and renamed into place, so a cached graph is always complete; processes exporting the
same key side by side (torchrun) keep whichever landed first.

int8 ONNX Runtime (`quantize_dynamic`) is not offered: its agreement with float32 is poor on the real MiniLM
(min cosine 0.94; bench/onnx_cpu.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline import UserError
from pipeline.store import guarded_write, remove_path

log = logging.getLogger(__name__)

ONNX_COMPUTE = "onnx-fp32"   # the store's `compute` for a model run by ONNX Runtime
OPSET = 17
FORMAT = 1                   # bump when the export changes in a way the key does not see
GRAPH, SIDECAR = "model.onnx", "graph.json"
ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(bool)": np.bool_, "tensor(double)": np.float64}


class OnnxCacheError(UserError, RuntimeError):
    """A cached ONNX graph that ONNX Runtime cannot load."""


def cache_dir() -> Path:
    """Where exported graphs are kept: $ERCFLOW_ONNX_CACHE, else ~/.cache/ercflow/onnx."""
    return Path(os.environ.get("ERCFLOW_ONNX_CACHE") or Path.home() / ".cache" / "ercflow" / "onnx")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dynamic_dims(example: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """The dims of each input that vary between calls: the batch, and the sequence of a 2-D input."""
    out = {}
    for name, x in example.items():
        dims = {0: "batch"} if x.dim() >= 1 else {}
        if x.dim() == 2:
            dims[1] = "sequence"
        out[name] = dims
    return out


def input_signature(example: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per input: dtype and shape, None at its dynamic dims (what a graph exported from `example` accepts)."""
    dyn = dynamic_dims(example)
    return {k: [str(x.dtype).replace("torch.", ""), [None if d in dyn[k] else int(n) for d, n in enumerate(x.shape)]]
            for k, x in example.items()}


def ensure_eager(model) -> None:
    """Switch a model loaded with SDPA / flash attention to eager attention (the only one that exports with
    dynamic shapes right); a model without a choice of attention is left as it is."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl in (None, "eager"):
        return
    if not hasattr(model, "set_attn_implementation"):
        raise RuntimeError(f"{type(model).__name__} runs {impl} attention and this transformers cannot switch it to "
                           "eager: load it with attn_implementation='eager' for runtime: onnx")
    model.set_attn_implementation("eager")


class _Positional(torch.nn.Module):
    """model(**named inputs) as a module with positional inputs and tensor outputs, for torch.onnx.export."""

    def __init__(self, model, names: list[str], hidden_states: bool):
        super().__init__()
        self.model, self.names, self.hidden_states = model, names, hidden_states

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)), output_hidden_states=self.hidden_states)
        return (out.last_hidden_state, *out.hidden_states) if self.hidden_states else out.last_hidden_state


def export_graph(model, example: dict[str, torch.Tensor], hidden_states: bool, path: Path) -> None:
    """Export `model` called on `example` to the ONNX file `path` (float32, opset 17, dynamic batch/sequence);
    outputs `last_hidden_state` and, with `hidden_states`, `hidden_state_<i>` for each of transformers'
    `hidden_states`."""
    names = list(example)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # TracerWarnings on shape checks; the TorchScript exporter's deprecation
        args = tuple(example[k].detach().clone() for k in names)   # plain tensors (the encoder runs in inference mode)
        n_hidden = len(model(**dict(zip(names, args)), output_hidden_states=True).hidden_states) if hidden_states else 0
        outputs = ["last_hidden_state"] + [f"hidden_state_{i}" for i in range(n_hidden)]
        dynamic = dynamic_dims(example)
        out_dims = {0: "batch", 1: "out_sequence"} if any(1 in d for d in dynamic.values()) else {0: "batch"}
        torch.onnx.export(_Positional(model, names, hidden_states), args, str(path), input_names=names,
                          output_names=outputs, dynamic_axes={**dynamic, **{o: out_dims for o in outputs}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def make_session(path: Path):
    """An ONNX Runtime CPU session on the graph at `path`: all graph optimisations, as many intra-op threads as
    torch uses."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = torch.get_num_threads(), 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def verified(folder: Path) -> bool:
    """Whether `folder` holds a complete graph whose files all match the sha256 its sidecar records."""
    try:
        meta = json.loads((folder / SIDECAR).read_text())
        files = meta["files"]
        on_disk = sorted(p.name for p in folder.iterdir() if p.name != SIDECAR)
        if GRAPH not in files or sorted(files) != on_disk:
            return False
        return all(file_sha256(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


class OnnxModel:
    """A transformers model run by ONNX Runtime (module docstring). `weights`: what identifies its weights
    (`weights`, `revision`) and `path`, the local weights whose content hash goes into the cache key."""

    def __init__(self, model, weights: dict[str, Any], path: str | None = None):
        ensure_eager(model)
        self.torch_model = model.eval()
        self.weights, self.weights_path = dict(weights), path
        self.sessions: dict[str, Any] = {}
        self._weights_hash: str | None = None

    @property
    def config(self):
        return self.torch_model.config

    def __getattr__(self, name):   # anything else is the torch model's (called only when not found here)
        if name == "torch_model":
            raise AttributeError(name)
        return getattr(self.torch_model, name)

    def key(self, example: dict[str, torch.Tensor], hidden_states: bool) -> str:
        """The cache key of the graph for these inputs (module docstring)."""
        import transformers

        from pipeline.runtime import weights_hash

        if self._weights_hash is None:
            self._weights_hash = (weights_hash(self.weights_path) if self.weights_path else None) or ""
        config = self.config.to_dict()
        for k in ("_name_or_path", "_commit_hash", "transformers_version"):
            config.pop(k, None)
        cls = type(self.torch_model)
        material = {"format": FORMAT, "weights": self.weights, "weights_hash": self._weights_hash,
                    "model_class": f"{cls.__module__}.{cls.__qualname__}", "config": config,
                    "attn_implementation": getattr(self.config, "_attn_implementation", None),
                    "inputs": input_signature(example), "hidden_states": bool(hidden_states), "opset": OPSET,
                    "torch": torch.__version__, "transformers": transformers.__version__}
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def session(self, example: dict[str, torch.Tensor], hidden_states: bool):
        key = self.key(example, hidden_states)
        if key not in self.sessions:
            folder = cache_dir() / key
            if not verified(folder):
                if folder.exists():
                    log.warning(f"{folder}: the cached ONNX graph does not match its recorded sha256: exporting again")
                self.export(folder, example, hidden_states)
            try:
                self.sessions[key] = make_session(folder / GRAPH)
            except Exception as e:   # onnxruntime's InvalidProtobuf, Fail, ...: a cached file that is no graph
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise OnnxCacheError(f"{folder / GRAPH}: not a loadable ONNX graph ({type(e).__name__}: {reason}), "
                                     f"though it matches its recorded sha256 (the cache was written by something "
                                     f"else); delete {folder} and run again, it is exported anew") from e
        return self.sessions[key]

    def export(self, folder: Path, example: dict[str, torch.Tensor], hidden_states: bool) -> None:
        """Export into a temp folder beside `folder`, record the files' sha256, rename it into place."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        start = time.perf_counter()
        with guarded_write(folder / GRAPH, tmp, then="free space and run again (or set ERCFLOW_ONNX_CACHE)"):
            tmp.mkdir()
            export_graph(self.torch_model, example, hidden_states, tmp / GRAPH)
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
            meta = {"files": files, "model_class": type(self.torch_model).__name__, "weights": self.weights,
                    "inputs": input_signature(example), "hidden_states": bool(hidden_states), "opset": OPSET,
                    "torch": torch.__version__, "exported_in_s": round(time.perf_counter() - start, 1)}
            (tmp / SIDECAR).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
            if folder.exists():   # a damaged copy: move it aside, then out of the way
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                try:
                    os.replace(folder, old)
                    remove_path(old)
                except FileNotFoundError:
                    pass
            try:
                os.replace(tmp, folder)
            except OSError:
                if not verified(folder):   # not another process's good copy that landed first
                    raise
                remove_path(tmp)
        log.info(f"exported {type(self.torch_model).__name__} to ONNX in {time.perf_counter() - start:.0f} s: {folder}")

    def __call__(self, output_hidden_states: bool | None = False, return_dict: bool | None = None, **inputs):
        example = {k: v for k, v in inputs.items() if v is not None}
        other = sorted(k for k, v in example.items() if not isinstance(v, torch.Tensor))
        if other:
            raise TypeError(f"OnnxModel: inputs must be tensors; got {other}")
        hidden = bool(output_hidden_states)
        session = self.session(example, hidden)
        feed = {i.name: example[i.name].detach().cpu().numpy().astype(ORT_TYPES[i.type], copy=False)
                for i in session.get_inputs()}
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        states = tuple(torch.from_numpy(outs[f"hidden_state_{i}"])
                       for i in range(sum(n.startswith("hidden_state_") for n in outs))) if hidden else None
        return SimpleNamespace(last_hidden_state=torch.from_numpy(outs["last_hidden_state"]), hidden_states=states)
