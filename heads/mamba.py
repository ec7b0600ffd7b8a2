"""Mamba over a dialogue's utterance sequence, from transformers' maintained implementation.

`MambaStack` is a stack of transformers' Mamba blocks (RMSNorm -> selective-state-space mixer -> residual)
and a final RMSNorm, built through `MambaModel` so that transformers' Mamba initialisation runs.
transformers' mixer calls the `mamba_ssm` / `causal_conv1d` CUDA kernels when they are installed and the
tensors are on a GPU, and its reference PyTorch selective scan otherwise: the same parameters and state dict
either way, so a head trained on a CPU loads on a GPU and back. `bench/mamba_agreement.py` runs the same
weights and input through both paths (CPU reference vs GPU kernels) and prints the largest difference.
"""
from __future__ import annotations

import torch
from torch import nn


class MambaStack(nn.Module):
    def __init__(self, d_model: int, layers: int = 1, state_size: int = 16, expand: int = 2, conv_kernel: int = 4):
        super().__init__()
        from transformers import MambaConfig, MambaModel

        config = MambaConfig(hidden_size=d_model, state_size=state_size, expand=expand, conv_kernel=conv_kernel,
                             num_hidden_layers=layers, residual_in_fp32=True, vocab_size=1)
        model = MambaModel(config)   # a bare MambaBlock would be left uninitialised
        self.blocks, self.norm = model.layers, model.norm_f

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, d]; mask [B, L] bool (True = real turn). Causal: padding at the end never reaches a real turn."""
        att = mask.long() if mask is not None else None
        for block in self.blocks:
            x = block(x, attention_mask=att)
        return self.norm(x)
