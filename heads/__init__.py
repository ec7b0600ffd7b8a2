"""Heads trained on cached features. One file per paper; `baselines.py` holds the simple ones.

Every head is an `ERCHead`: it maps a `DialogueBatch` to per-utterance outputs [B, L, C] (class logits, or
one value per dimension for dimensional targets) and owns its loss.

A modality whose store kept several encoder layers (features [B, L, n_layers, D]) is given to the head as
(n_layers, D) in `dims`: the head gets a `LayerMix` for it (heads/layers.py) and `mix(batch)`, the first step
of every head's `forward` and `loss`, turns its features into [B, L, D]; the rest of the head sees D only.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from heads.data import IGNORE, DialogueBatch
from heads.layers import LayerMix
from pipeline.registry import Registry

# head name -> class, filled by `@register(name)` in each head's file (heads/registry.py imports them all)
HEADS: Registry[type["ERCHead"]] = Registry("head")
register = HEADS.register


CLASS_WEIGHTS = ("none", "inverse", "sqrt_inverse")


def class_weights(counts: np.ndarray, scheme: str) -> np.ndarray | None:
    """Per-class CE weights from the train split's label counts: `inverse` w_c ∝ 1 / n_c, `sqrt_inverse`
    w_c ∝ 1 / sqrt(n_c), scaled so that the average weight over the training utterances is 1 (the loss keeps
    its scale, so the learning rate means the same). A class absent from train gets weight 0."""
    if scheme == "none":
        return None
    if scheme not in CLASS_WEIGHTS:
        raise ValueError(f"class_weights must be one of {CLASS_WEIGHTS}, not {scheme!r}")
    counts = np.asarray(counts, np.float64)
    w = np.where(counts > 0, 1.0 / np.maximum(counts, 1) ** (1.0 if scheme == "inverse" else 0.5), 0.0)
    return (w * counts.sum() / (w * counts).sum()).astype(np.float32)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, weight: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Focal loss (Lin et al., 2017, arXiv:1708.02002): mean of -w_y (1 - p_y)^gamma log p_y over the
    labelled rows (target != IGNORE), normalised by the sum of their weights as weighted CE is; gamma 0 is CE."""
    keep = target != IGNORE
    logits, target = logits[keep], target[keep]
    if not len(target):
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
    w = weight[target] if weight is not None else torch.ones_like(log_p)
    return -(w * (1 - log_p.exp()) ** gamma * log_p).sum() / w.sum().clamp(min=1e-12)


def layer_shape(dim) -> tuple[int | None, int]:
    """(number of layers or None, feature size) of a modality's input size: D, or (L, D) for L layers."""
    shape = [int(d) for d in np.atleast_1d(dim)]
    if len(shape) == 1:
        return None, shape[0]
    if len(shape) == 2 and shape[0] > 1:
        return shape[0], shape[1]
    raise ValueError(f"an input size is D or (layers, D) with at least 2 layers, not {dim!r}")


class ERCHead(nn.Module):
    """Base: `forward(batch) -> outputs [B, L, n_out]`; `loss(batch, outputs)` is CE or MSE by task.

    The categorical task loss may be class-weighted and focal (`set_task_loss`, from the trainer params);
    the papers' own terms (TelME's distillation, MaTAV's MEC) are added to it unchanged.

    `dims[m]` is D, or (n_layers, D) for a store of several layers: `self.dims[m]` is D either way, and
    `self.mixers[m]` the LayerMix of such a modality (no mixer, parameter or state otherwise)."""

    def __init__(self, dims: dict[str, int | tuple[int, int]], n_out: int, task: str):
        super().__init__()
        shapes = {m: layer_shape(d) for m, d in dims.items()}
        self.dims, self.n_out, self.task = {m: d for m, (_, d) in shapes.items()}, n_out, task
        self.modalities = list(dims)
        self.mixers = nn.ModuleDict({m: LayerMix(n) for m, (n, _) in shapes.items() if n is not None})
        self.register_buffer("ce_weight", None, persistent=False)
        self.focal_gamma = 0.0

    @classmethod
    def normalization(cls, modalities, normalize: dict | None = None, **_) -> dict[str, bool]:
        """Per input modality: standardise it with the train split's statistics (True) or feed it raw. Every
        head's `normalize` option (modality -> standard | none) decides; unnamed modalities are standardised
        unless the head's class says otherwise (TelME: its teacher raw). heads/data.py applies it."""
        return {m: (normalize or {}).get(m, "standard") == "standard" for m in modalities}

    def mix(self, batch: DialogueBatch) -> DialogueBatch:
        """The batch with each layered modality's features [B, L, n_layers, D] mixed to [B, L, D] (the same
        batch when there is nothing to mix); several-layer features without a mixer are refused."""
        mixed = {}
        for m, x in batch.features.items():
            if x.dim() != 4:
                continue
            if m not in self.mixers:
                raise ValueError(f"{m}: features of {x.shape[-2]} layers, but this head was built for one-layer "
                                 f"{m} features (give its dims as (layers, D) to learn a layer mix)")
            mixed[m] = self.mixers[m](x)
        return dataclasses.replace(batch, features={**batch.features, **mixed}) if mixed else batch

    def layer_weights(self) -> dict[str, list[float]]:
        """The learned softmax weight of each layer, per layered modality (what carries the emotion)."""
        return {m: [float(w) for w in mix.weights().detach().cpu()] for m, mix in self.mixers.items()}

    def set_task_loss(self, weight: np.ndarray | None = None, focal_gamma: float = 0.0) -> None:
        self.ce_weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        self.focal_gamma = float(focal_gamma)

    def task_loss(self, batch: DialogueBatch, out: torch.Tensor) -> torch.Tensor:
        if self.task == "categorical":
            logits, target = out.reshape(-1, out.shape[-1]), batch.labels.reshape(-1)
            if self.focal_gamma:
                return focal_loss(logits, target, self.focal_gamma, self.ce_weight)
            return F.cross_entropy(logits, target, weight=self.ce_weight, ignore_index=IGNORE)
        target = batch.dims
        ok = torch.isfinite(target) & batch.mask[..., None]
        # select before the loss: NaN * 0 is still NaN in the gradient
        return F.mse_loss(out[ok], target[ok]) if ok.any() else out.sum() * 0.0

    def prepare(self, data) -> None:
        """Called once by the trainer before training, with the CachedDialogues (e.g. to fit a frozen part)."""

    def loss(self, batch: DialogueBatch, out: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.task_loss(batch, out)
        return loss, {"task": float(loss.detach())}
