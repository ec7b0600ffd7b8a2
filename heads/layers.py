"""A learned weighted sum of an encoder's hidden layers, in front of a head (SUPERB, Yang et al., 2021,
arXiv:2105.01051, §3; ELMo, Peters et al., 2018, arXiv:1802.05365, eq. 1).

A store that kept several hidden layers gives a modality's features as [..., L, D] (pipeline/store/);
`LayerMix` turns them into [..., D] = gamma * sum_l softmax(w)_l x_l. The weights start equal (w = 0), so an
untrained mix is the mean of the layers; gamma (ELMo's scale, optional; SUPERB has none) starts at 1. Each
layer is standardised with the train split's statistics before the mix (heads/data.py), so the weights compare
layers of comparable scale.
"""
from __future__ import annotations

import torch
from torch import nn


class LayerMix(nn.Module):
    """x [..., L, D] -> gamma * sum_l softmax(w)_l x[..., l, :] ([..., D])."""

    def __init__(self, n_layers: int, scale: bool = True):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_layers))
        self.gamma = nn.Parameter(torch.ones(())) if scale else None

    @property
    def n_layers(self) -> int:
        return int(self.logits.shape[0])

    def weights(self) -> torch.Tensor:
        """softmax(w): [L], non-negative, summing to one."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.n_layers:
            raise ValueError(f"LayerMix of {self.n_layers} layers got features of {x.shape[-2]} layers "
                             f"(shape {tuple(x.shape)})")
        out = torch.einsum("...ld,l->...d", x, self.weights().to(x.dtype))
        return out * self.gamma if self.gamma is not None else out
