"""The models a fine-tune trains: an encoder, its pooled vector (-> a projection to a teacher's size) ->
dropout -> a linear layer over the labels. The pooled (projected) vector is the feature the store keeps.

- `TextClassifier`: the text teacher's (DialogueTRM: BERT on `indi_context`; TelME: RoBERTa on `prompt`), the
  token at the pooling position (cls / mean / the prompt's <mask>), as the hf_text encoder pools.
- `AudioClassifier`: a speech encoder's (TelME's audio student: data2vec-audio) last frames averaged over the
  model's own frame mask, as the hf_audio encoder's features are.
- `VideoClassifier`: a video transformer's (TelME's visual student: TimeSformer) CLS token or the mean of its
  patch tokens, as the hf_video encoder pools.

A student whose size differs from its teacher's gets the projection (`d_out`): TelME's feature KD (arXiv
2401.12987, eq. 13-15) compares the two in one space, and its fusion reads the projected vector.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.encoders.text import pool_hidden


class Classifier(nn.Module):
    """Encoder -> pooled vector (-> projection to a teacher's size) -> dropout -> linear layer. The pooled
    (projected) vector is the feature the store keeps."""

    def __init__(self, encoder, n_labels: int, dropout: float, d_out: int | None = None):
        super().__init__()
        self.encoder = encoder
        d = int(encoder.config.hidden_size)
        self.projection = nn.Linear(d, d_out) if d_out and d_out != d else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_out or d, n_labels)

    @property
    def dim(self) -> int:
        """The size of the pooled (projected) vector: the store's feature size."""
        return int(self.classifier.in_features)

    def pool(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pool(batch)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return pooled, self.classifier(self.dropout(pooled))


class TextClassifier(Classifier):
    """Text encoder, the feature at the pooling position (cls / mean / the prompt's <mask>)."""

    def __init__(self, encoder, n_labels: int, pooling: str, mask_token_id: int | None, dropout: float,
                 d_out: int | None = None):
        super().__init__(encoder, n_labels, dropout, d_out)
        self.pooling, self.mask_token_id = pooling, mask_token_id

    def pool(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        return pool_hidden(hidden, batch, self.pooling, self.mask_token_id)


class AudioClassifier(Classifier):
    """Speech encoder, its last hidden frames averaged over the model's frame mask (as the hf_audio encoder's
    features are), so padding in a batch never enters the pooled vector."""

    def pool(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state.float()
        frames = self.encoder._get_feature_vector_attention_mask(hidden.shape[1], batch["attention_mask"])
        frames = frames.to(hidden.dtype)
        return (hidden * frames[..., None]).sum(1) / frames.sum(1, keepdim=True).clamp(min=1)


class VideoClassifier(Classifier):
    """Video transformer, its CLS token or the mean of its patch tokens (as the hf_video encoder pools)."""

    def __init__(self, encoder, n_labels: int, pooling: str, dropout: float, d_out: int | None = None):
        super().__init__(encoder, n_labels, dropout, d_out)
        self.pooling = pooling

    def pool(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state.float()
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(1)
