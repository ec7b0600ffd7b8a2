"""Visual encoders over the media store's canonical frames.

- `cnn3d`: a C3D-style 3D-CNN on the utterance's frame clip (DialogueTRM's visual input comes from a
  3D-CNN). Weights from a `state_dict` file; without one it is a seeded random-init network, and the store
  says so (`weights: random-init(seed=...)`) — enough to carry colour and motion cues, not a trained model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.encoders import Encoder, masked_problem, register, resolve_device, weights_hash
from pipeline.manifest import Manifest
from pipeline.store import MediaStore


class C3D(nn.Module):
    """Four conv3d-BN-ReLU-pool blocks, global average pool, linear projection to `out_dim`."""

    def __init__(self, width: int = 32, out_dim: int = 128):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for i in range(4):
            blocks += [nn.Conv3d(chans[i], chans[i + 1], 3, padding=1), nn.BatchNorm3d(chans[i + 1]), nn.ReLU(),
                       nn.MaxPool3d((1, 2, 2) if i == 0 else 2, ceil_mode=True)]
        self.features = nn.Sequential(*blocks)
        self.proj = nn.Linear(chans[-1], out_dim)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:   # [B, 3, F, H, W] in [0, 1]
        return self.proj(self.features(clip).mean(dim=(2, 3, 4)))


@dataclass
class Cnn3dConfig:
    weights: str | None = None   # a state_dict (.pt) of C3D(width, out_dim); None: random init
    seed: int = 0
    width: int = 32
    out_dim: int = 128
    batch_size: int = 16
    device: str = "auto"


@register
class Cnn3dEncoder(Encoder):
    kind = "cnn3d"
    modality = "visual"
    needs_media = True
    Config = Cnn3dConfig

    def __init__(self, name, config: Cnn3dConfig):
        super().__init__(name, config)
        torch.manual_seed(config.seed)
        self.net = C3D(config.width, config.out_dim)
        if config.weights:
            self.net.load_state_dict(torch.load(config.weights, map_location="cpu", weights_only=True))
        self.device = resolve_device(config.device)
        self.net.to(self.device).eval()

    @property
    def dim(self) -> int:
        return self.config.out_dim

    def provenance(self):
        c = self.config
        return {**super().provenance(), "weights": c.weights or f"random-init(seed={c.seed})",
                "weights_hash": weights_hash(c.weights) if c.weights else None}

    def encode(self, rows: pd.DataFrame, manifest: Manifest, media: MediaStore):
        ids = rows["utt_id"].tolist()
        valid = media.fixed("video_valid", ids).astype(bool)
        problems = [masked_problem(r, r.get("video", ""), "video masked at decode", "visual")
                    for (_, r), ok in zip(rows.iterrows(), valid) if not ok]
        pooled = np.zeros((len(ids), self.dim), np.float32)
        with torch.inference_mode():
            for s in range(0, len(ids), self.config.batch_size):
                frames = np.stack([media.frames(u) for u in ids[s:s + self.config.batch_size]])  # [B,F,H,W,3]
                clip = torch.from_numpy(frames).to(self.device).permute(0, 4, 1, 2, 3).float() / 255.0
                pooled[s:s + len(frames)] = self.net(clip).float().cpu().numpy()
        pooled[~valid] = 0.0
        return {"pooled": pooled, "valid": valid}, problems
