"""Heads trained on cached features. One file per paper; `baselines.py` holds the simple ones.

Every head is an `ERCHead`: it maps a `DialogueBatch` to per-utterance outputs [B, L, C] (class logits, or
one value per dimension for dimensional targets) and owns its loss.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from heads.data import IGNORE, DialogueBatch

HEADS: dict[str, type["ERCHead"]] = {}


def register(name: str):
    def deco(cls):
        HEADS[name] = cls
        cls.registry_name = name
        return cls
    return deco


class ERCHead(nn.Module):
    """Base: `forward(batch) -> outputs [B, L, n_out]`; `loss(batch, outputs)` is CE or MSE by task."""

    def __init__(self, dims: dict[str, int], n_out: int, task: str):
        super().__init__()
        self.dims, self.n_out, self.task = dims, n_out, task
        self.modalities = list(dims)

    def task_loss(self, batch: DialogueBatch, out: torch.Tensor) -> torch.Tensor:
        if self.task == "categorical":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE)
        target = batch.dims
        ok = torch.isfinite(target) & batch.mask[..., None]
        # select before the loss: NaN * 0 is still NaN in the gradient
        return F.mse_loss(out[ok], target[ok]) if ok.any() else out.sum() * 0.0

    def prepare(self, data) -> None:
        """Called once by the trainer before training, with the CachedDialogues (e.g. to fit a frozen part)."""

    def loss(self, batch: DialogueBatch, out: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.task_loss(batch, out)
        return loss, {"task": float(loss.detach())}


def build_head(name: str, dims: dict[str, int], n_out: int, task: str, options: dict) -> ERCHead:
    from heads import baselines, dialoguetrm, matav, telme  # noqa: F401  (fill the registry)

    if name not in HEADS:
        raise ValueError(f"unknown head '{name}'; known: {sorted(HEADS)}")
    cls = HEADS[name]
    options = dict(options)
    preset = options.pop("paper_defaults", None)
    if preset is not None:
        presets = getattr(cls, "PAPER_DEFAULTS", {})
        if preset not in presets:
            raise ValueError(f"head '{name}': no paper_defaults '{preset}'; known: {sorted(presets)}")
        options = {**presets[preset], **options}   # explicit options override the paper's table
    return cls(dims, n_out, task, **options)
