"""LoRA fine-tuning through peft (`finetune.<name>.lora`): the model's weights stay frozen, low-rank adapters
are trained beside them (LoRA, arXiv 2106.09685: W x + (alpha / r) B A x, B initialised to zero so training starts
at the base model), and only the adapter is saved.

- `adapt(model, lora, where)`: the model wrapped by peft (`get_peft_model`), every base weight frozen; with
  `lora.quantize` (QLoRA, arXiv 2305.14314) the base was loaded through bitsandbytes on CUDA and is prepared for
  k-bit training first (peft's `prepare_model_for_kbit_training`).
- The checkpoint's `encoder/` then holds the adapter only (`adapter_config.json`, `adapter_model.safetensors`),
  plus the tokenizer / processor; `checkpoint.json` records the base weights' content hash (`base_weights_hash`).
- `load_adapter(folder, model, ...)` reads `adapter_model.safetensors` with safetensors (never a pickle: a folder
  holding `adapter_model.bin` or any `PICKLE_SUFFIXES` file is refused by name), refuses an adapter of another
  rank, alpha or target modules, and one trained on a base whose content hash differs from this base's.

A kind calls `adapt` where it would train the whole model (pipeline/finetune/kinds.py, llm.py); the loop, the
checkpoint format, resume and DDP are those of a full fine-tune: only the trainable parameters differ.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import PICKLE_SUFFIXES, first_line
from pipeline.runtime import resolve_weights, weights_hash
from pipeline.store import StoreError, what_to_do

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

log = logging.getLogger(__name__)


class AdapterError(StoreError):
    """A LoRA adapter folder that is pickled, damaged, of another shape or trained on other base weights."""


def is_adapted(model: nn.Module) -> bool:
    """`model` is a peft model (its base frozen, adapters trained)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def peft_config(lora):
    """peft's LoraConfig of params `lora` (pipeline/configs.py `LoraParams`)."""
    from peft import LoraConfig

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      bias="none")


def adapt(model: nn.Module, lora, where: str, gradient_checkpointing: bool = False) -> nn.Module:
    """`model` with LoRA adapters (`lora`: `LoraParams`; `where`: its params key, for errors), base frozen."""
    from peft import get_peft_model

    if lora.quantize != "none":
        from peft import prepare_model_for_kbit_training

        # casts norms to float32 and lets the input embeddings' output require grad (the base is frozen)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()   # checkpointed blocks need an input that requires grad
    try:
        wrapped = get_peft_model(model, peft_config(lora))
    except ValueError as e:   # peft: "Target modules {...} not found in the base model"
        raise AdapterError(f"{where}.target_modules: {first_line(e)} (a {type(model).__name__}'s linear layers "
                           f"are named e.g. {linear_names(model)[:8]})") from None
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info(f"{where}: LoRA r {lora.r}, alpha {lora.alpha}: {trainable:,} of {total:,} parameters trained "
             f"({100 * trainable / max(total, 1):.2f}%)")
    return wrapped


def linear_names(model: nn.Module) -> list[str]:
    """The distinct names of `model`'s linear layers (what `target_modules` may list)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def base_weights_dir(weights: str, revision: str | None = None) -> str | None:
    """Where base weights `weights` (a local dir, `package:...` or a hub id) are on this machine: a hub id's
    snapshot in the Hugging Face cache (never downloaded here), or None."""
    path = resolve_weights(weights)
    if Path(path).exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, revision=revision, local_files_only=True)
    except Exception:   # noqa: BLE001  (not cached, not a hub id: no content to hash)
        return None


def base_weights_hash(weights: str, revision: str | None = None) -> str | None:
    """The content hash of the base weights' files (pipeline/runtime.py `weights_hash`), None when not here."""
    folder = base_weights_dir(weights, revision)
    return weights_hash(folder) if folder else None


def frozen_weights_hash(model: nn.Module) -> str:
    """A hash of the values of every parameter and buffer of `model` that is not a LoRA adapter's: equal before
    and after a LoRA fine-tune (the base is not trained)."""
    h = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name in sorted(tensors):
        if "lora_" in name:
            continue
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def pickles_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.name.endswith(PICKLE_SUFFIXES))


def load_adapter(folder: Path, model: nn.Module, lora, ckpt: Path, recorded_base: str | None,
                 base_hash: str | None) -> None:
    """Load the adapter saved in `folder` (a checkpoint's `encoder/`) into peft model `model`, built with params
    `lora`. `recorded_base`: the base weights' hash the checkpoint was trained on; `base_hash`: this base's.
    Every refusal is an `AdapterError` naming the file (`ckpt`: the checkpoint to delete to start over)."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for f in pickles_in(folder):
        raise AdapterError(f"{f}: refused: a pickle file in a LoRA adapter (unpickling can run code; ercflow reads "
                           f"adapters as {ADAPTER_WEIGHTS} only); {what_to_do(f, delete=ckpt)}")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS} (this fine-tune trains LoRA adapters: its checkpoint "
                           f"holds an adapter, not a whole model); {what_to_do(folder, delete=ckpt)}")
    if recorded_base and base_hash and recorded_base != base_hash:
        raise AdapterError(f"{ckpt}: its adapter was trained on base weights of content hash {recorded_base}, the "
                           f"base weights here hash to {base_hash}: use the very weights it was trained on (an "
                           "adapter on other weights computes something else)")
    try:
        saved = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{folder / ADAPTER_CONFIG}: missing or damaged ({first_line(e)}); "
                           f"{what_to_do(folder, delete=ckpt)}") from e
    want = peft_config(lora)
    for key, ours in (("r", want.r), ("lora_alpha", want.lora_alpha)):
        if saved.get(key) != ours:
            raise AdapterError(f"{folder / ADAPTER_CONFIG}: {key} {saved.get(key)!r}, this fine-tune's lora gives "
                               f"{ours!r}; {what_to_do(folder, delete=ckpt)}")
    try:
        tensors = load_file(folder / ADAPTER_WEIGHTS, device="cpu")
    except (OSError, SafetensorError, ValueError) as e:
        raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: not a readable safetensors file ({first_line(e)}); "
                           f"{what_to_do(folder, delete=ckpt)}") from e
    expected = {k for k in model.state_dict() if "lora_" in k}
    try:
        result = set_peft_model_state_dict(model, tensors)
    except RuntimeError as e:   # shapes that differ
        raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: does not fit this model's adapters ({first_line(e)}); "
                           f"{what_to_do(folder, delete=ckpt)}") from e
    missing = sorted(k for k in expected if k in set(getattr(result, "missing_keys", [])))
    if getattr(result, "unexpected_keys", None) or missing:
        raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: does not fit this model's adapters (unexpected "
                           f"{list(result.unexpected_keys)[:3]}, missing {missing[:3]}); "
                           f"{what_to_do(folder, delete=ckpt)}")


def adapted(tuner, model: nn.Module, where: str = "finetune", quantized: bool = False) -> nn.Module:
    """`model` as fine-tuner `tuner` trains it: with LoRA adapters when its params have `lora` (recording the
    base weights' content hash as `tuner.base_hash`), else as it is. `quantized`: the kind loaded the base
    through bitsandbytes (the text LLM does; the audio / video kinds load float weights and refuse QLoRA)."""
    p = tuner.p
    if p.lora is None:
        return model
    if p.lora.quantize != "none" and not quantized:
        from pipeline.params import ParamsError

        raise ParamsError(f"{where}.lora.quantize: {p.lora.quantize} (QLoRA) loads a decoder-only LLM through "
                          f"bitsandbytes; a {tuner.kind} fine-tune trains float weights: set quantize: none")
    tuner.base_hash = base_weights_hash(p.weights, p.revision)
    # the adapters' A matrices are drawn at random: from the fine-tune's seed, not from whatever the process's
    # RNG holds (two runs of one config, and every DDP rank, start from the same adapters), without touching it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        return adapt(model, p.lora, f"{where}.lora", p.gradient_checkpointing)
