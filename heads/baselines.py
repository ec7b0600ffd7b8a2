"""Baselines: a per-modality MLP with late fusion (a single modality is the unimodal baseline)."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from heads import ERCHead, register
from heads.data import DialogueBatch
from pipeline.vocab import Modality


@register("late_fusion")
class LateFusionMLP(ERCHead):
    """h_m = Dropout(ReLU(W_m x_m)) per modality (zeros where the modality is masked), then
    y = W_o [h_t ; h_a ; h_v]. Context-free: each utterance is classified on its own features."""

    def __init__(self, dims, n_out, task, hidden: int = 128, dropout: float = 0.2,
                 normalize: dict[Modality, Literal["standard", "none"]] | None = None):   # ERCHead.normalization
        super().__init__(dims, n_out, task)
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout))
                                       for m, d in self.dims.items()})
        self.out = nn.Linear(hidden * len(dims), n_out)

    def forward(self, batch: DialogueBatch) -> torch.Tensor:
        batch = self.mix(batch)
        parts = [self.encoders[m](batch.features[m]) * batch.valid[m][..., None] for m in self.modalities]
        return self.out(torch.cat(parts, dim=-1))
