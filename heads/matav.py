"""MaTAV (matav.md §II) on cached features: TAV-alignment with the MEC loss, cross-attention fusion over
[t || a || v], a Mamba network over the dialogue, softmax classifier.

- Alignment (§II-C, eq. 1-5): projection heads g_m map each modality to normalised 256-d vectors; momentum
  copies g'_m (exponential moving average, MoCo) fill three queues of the most recent M keys; `mec_loss`
  is the InfoNCE of eq. 5 over the pairs (T, A'), (A, V'), (T, V'), the momentum key of the same utterance
  as positive and the queue as negatives. Eq. 1-4 use the raw cosine (temperature 1, as written);
  ALBEF's 0.07 is a param. As written, g_v is never a query (only its momentum copy gives keys), so it does
  not learn; `mec_symmetric: true` adds the reverse terms (A, T'), (V, A'), (V, T') as ALBEF does.
- Fusion (§II-D, eq. 6-7): the three utterance vectors (projected to d_model) are a 3-token sequence through
  six self-attention layers; their outputs are merged, f = W_F [t || a || v], then z = FC(f).
- Context: Mamba blocks over the dialogue's z_1..z_n (causal; `heads.mamba.MambaStack`), then eq. 8.
- Loss: CE + mec_weight * L_MEC (0.3). Ablations: `mamba: false` (w/o Mamba), `mec_weight: 0` (w/o MEC).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from heads import ERCHead, register
from heads.data import DialogueBatch
from heads.mamba import MambaStack

PAIRS = (("text", "audio"), ("audio", "visual"), ("text", "visual"))   # (T, A'), (A, V'), (T, V')


class ProjectionHead(nn.Module):
    """g_m: a linear map to the alignment space, L2-normalised (eq. 1)."""

    def __init__(self, d_in: int, d_out: int = 256):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=-1)


def mec_term(query: torch.Tensor, positive_key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """One term of eq. 5: -log exp(s(q, k+)) / sum_j exp(s(q, k_j)), over k+ and the queue's keys.

    query, positive_key: [n, d] normalised; queue: [M, d] normalised. Mean over the n queries."""
    pos = (query * positive_key).sum(-1, keepdim=True)
    neg = query @ queue.t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


class TAVAlignment(nn.Module):
    """Projection heads, their momentum copies and the three key queues (MoCo)."""

    def __init__(self, dims: dict[str, int], d_proj: int, queue_size: int, momentum: float, temperature: float,
                 symmetric: bool = False):
        super().__init__()
        self.pairs = PAIRS + (tuple((k, q) for q, k in PAIRS) if symmetric else ())
        self.heads = nn.ModuleDict({m: ProjectionHead(d, d_proj) for m, d in dims.items()})
        self.momentum_heads = copy.deepcopy(self.heads).requires_grad_(False)
        self.momentum, self.temperature = momentum, temperature
        for m in dims:
            self.register_buffer(f"queue_{m}", F.normalize(torch.randn(queue_size, d_proj), dim=-1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def queue(self, m: str) -> torch.Tensor:
        return getattr(self, f"queue_{m}")

    @torch.no_grad()
    def momentum_update(self) -> None:
        for p, q in zip(self.heads.parameters(), self.momentum_heads.parameters()):
            q.mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: dict[str, torch.Tensor]) -> None:
        n = next(iter(keys.values())).shape[0]
        size = self.queue(next(iter(keys))).shape[0]
        ptr = int(self.queue_ptr)
        idx = (torch.arange(n, device=self.queue_ptr.device) + ptr) % size
        for m, k in keys.items():
            self.queue(m)[idx] = k[-size:] if n > size else k
        self.queue_ptr[0] = (ptr + n) % size

    def loss(self, feats: dict[str, torch.Tensor], update: bool) -> torch.Tensor:
        """L_MEC (eq. 5) of [n, d_m] features of the same n utterances."""
        queries = {m: self.heads[m](x) for m, x in feats.items()}
        if update:
            self.momentum_update()
        with torch.no_grad():
            keys = {m: self.momentum_heads[m](x) for m, x in feats.items()}
        loss = sum(mec_term(queries[q], keys[k], self.queue(k).clone().detach(), self.temperature)
                   for q, k in self.pairs if q in feats and k in feats)
        if update:
            self.enqueue(keys)
        return loss


@register("matav")
class MaTAV(ERCHead):
    def __init__(self, dims, n_out, task, d_model: int = 256, d_proj: int = 256, attention_layers: int = 6,
                 heads: int = 4, mamba_layers: int = 1, state_size: int = 16, dropout: float = 0.1,
                 queue_size: int = 4096, momentum: float = 0.995, temperature: float = 1.0, mec_weight: float = 0.3,
                 mec_symmetric: bool = False, mamba: bool = True):
        super().__init__(dims, n_out, task)
        self.mec_weight = mec_weight
        self.align = TAVAlignment(dims, d_proj, queue_size, momentum, temperature, mec_symmetric)
        self.inputs = nn.ModuleDict({m: nn.Linear(d, d_model) for m, d in dims.items()})
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True)
        self.cross_attention = nn.TransformerEncoder(layer, attention_layers, enable_nested_tensor=False)  # eq. 6-7
        self.merge = nn.Linear(d_model * len(dims), d_model)           # f = W_F [t || a || v]
        self.fc = nn.Linear(d_model, d_model)                          # z_i = FC(f_i)
        self.mamba = MambaStack(d_model, mamba_layers, state_size) if mamba else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model, n_out)                    # eq. 8

    def forward(self, batch: DialogueBatch) -> torch.Tensor:
        m = batch.mask   # the per-utterance fusion runs on real turns only; Mamba then sees the padded dialogue
        toks = torch.stack([self.inputs[k](batch.features[k][m] * batch.valid[k][m][..., None])
                            for k in self.modalities], dim=1)          # [n_utt, n_mod, d]
        fused = self.cross_attention(toks).flatten(1)
        z = batch.padded(self.fc(self.merge(fused)))
        if self.mamba is not None:
            z = self.mamba(z, batch.mask)
        return self.classifier(self.dropout(z))

    def loss(self, batch: DialogueBatch, out: torch.Tensor):
        ce = self.task_loss(batch, out)
        parts = {"task": float(ce.detach())}
        if self.mec_weight and len(self.modalities) > 1:
            ok = batch.mask.clone()
            for m in self.modalities:
                ok &= batch.valid[m]
            if ok.sum() > 1:
                mec = self.align.loss({m: batch.features[m][ok] for m in self.modalities}, update=self.training)
                parts["mec"] = float(mec.detach())
                return ce + self.mec_weight * mec, parts
        return ce, parts
