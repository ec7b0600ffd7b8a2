"""MaTAV (arXiv:2409.05243 §II) on cached features: TAV-alignment with the MEC loss, cross-attention fusion over
[t || a || v], a Mamba network over the dialogue, softmax classifier.

- Alignment (§II-C, eq. 1-5): projection heads g_m map each modality to normalised 256-d vectors; momentum
  copies g'_m (exponential moving average, MoCo) fill three queues of the most recent M keys; `mec_term`
  is one term of the InfoNCE of eq. 5 over the pairs (T, A'), (A, V'), (T, V'), the momentum key of the same utterance
  as positive and the queue as negatives. Eq. 1-4 use the raw cosine (temperature 1, as written);
  ALBEF's 0.07 is a param. A pair is computed over the utterances where both of its modalities are valid.
  As written, g_v is never a query (only its momentum copy gives keys), so MEC never shapes g_v (the CE
  still trains it through the fusion); `mec_symmetric: true` adds the reverse terms (A, T'), (V, A'), (V, T')
  as ALBEF does.
- Fusion (§II-D, eq. 6-7): "the aligned features" are fused: the tokens are g_m(x_m), the very projections
  MEC trains, scaled by sqrt(d_proj) and mapped to d_model by one linear map shared by all modalities. The
  3-token sequence goes through six self-attention layers; their outputs are merged, f = W_F [t || a || v],
  then z = FC(f). A masked modality is neither attended to nor part of f. `fusion_block` says what a layer is:
  `attention` is eq. 6-7 as printed (Q, K, V = W_Q/W_K/W_V [t||a||v], softmax(QK^T / sqrt(d_k)) V and the
  heads' output map, nothing else); `transformer` (default) a full `nn.TransformerEncoderLayer` (that attention
  plus residual connections, LayerNorms and a feed-forward block). The default is the reading that trains:
  six bare attention layers stacked lose rank doubly exponentially with depth (Dong et al., 2021,
  arXiv:2103.03404: pure attention collapses every token towards one vector), which the residuals and the
  feed-forward block of the standard layer prevent; the paper names no such parts, and has no public code of
  its own to settle it.
- Context: Mamba blocks over the dialogue's z_1..z_n (causal; `heads.mamba.MambaStack`), then eq. 8.
- Loss: CE + mec_weight * L_MEC (0.3). Ablations: `mamba: false` (w/o Mamba), `mec_weight: 0` (w/o MEC).
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from heads import ERCHead, register
from heads.data import DialogueBatch
from heads.mamba import MambaStack
from pipeline.vocab import Modality

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
    """Projection heads g_m, their momentum copies g'_m and one key queue per modality (MoCo)."""

    def __init__(self, dims: dict[str, int], d_proj: int, queue_size: int, momentum: float, temperature: float,
                 symmetric: bool = False):
        super().__init__()
        self.pairs = PAIRS + (tuple((k, q) for q, k in PAIRS) if symmetric else ())
        self.heads = nn.ModuleDict({m: ProjectionHead(d, d_proj) for m, d in dims.items()})
        self.momentum_heads = copy.deepcopy(self.heads).requires_grad_(False)
        self.momentum, self.temperature = momentum, temperature
        for m in dims:
            self.register_buffer(f"queue_{m}", F.normalize(torch.randn(queue_size, d_proj), dim=-1))
            # one pointer per queue: a modality masked for some utterances enqueues fewer keys than the others
            self.register_buffer(f"queue_ptr_{m}", torch.zeros(1, dtype=torch.long))

    def queue(self, m: str) -> torch.Tensor:
        return getattr(self, f"queue_{m}")

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """g_m(x_m) for every modality: the aligned representations that the fusion attends over."""
        return {m: self.heads[m](x) for m, x in feats.items()}

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta' <- m theta' + (1 - m) theta (MoCo's momentum encoder)."""
        for p, q in zip(self.heads.parameters(), self.momentum_heads.parameters()):
            q.mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def enqueue(self, m: str, keys: torch.Tensor) -> None:
        """Ring-buffer write of the newest keys; a batch with more keys than the queue keeps its last M."""
        queue, ptr = self.queue(m), getattr(self, f"queue_ptr_{m}")
        keys = keys[-len(queue):]
        idx = (torch.arange(len(keys), device=queue.device) + int(ptr)) % len(queue)
        queue[idx] = keys
        ptr[0] = (int(ptr) + len(keys)) % len(queue)

    def loss(self, feats: dict[str, torch.Tensor], valid: dict[str, torch.Tensor], update: bool) -> torch.Tensor | None:
        """L_MEC (eq. 5) of [n, d_m] features of the same n utterances; `valid[m]` [n] bool.

        Each pair (q, k) is computed over the utterances where both q and k are valid, so a masked audio
        clip drops only the pairs that involve audio. None when no pair has an utterance."""
        queries = self(feats)
        if update:
            self.momentum_update()
        with torch.no_grad():
            keys = {m: self.momentum_heads[m](x) for m, x in feats.items()}
        terms = []
        for q, k in self.pairs:
            if q in feats and k in feats:
                both = valid[q] & valid[k]
                if both.any():
                    terms.append(mec_term(queries[q][both], keys[k][both], self.queue(k).clone().detach(),
                                          self.temperature))
        if update:
            for m, key in keys.items():
                self.enqueue(m, key[valid[m]])
        return sum(terms) if terms else None


class AttentionStack(nn.Module):
    """Eq. 6-7 as printed, `layers` times: x <- MultiHeadAttention(x, x, x) over the modality tokens, no
    residual, norm or feed-forward. `forward(x, src_key_padding_mask=...)` as nn.TransformerEncoder's."""

    def __init__(self, d_model: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
                                    for _ in range(layers))

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for attention in self.layers:
            x = attention(x, x, x, key_padding_mask=src_key_padding_mask, need_weights=False)[0]
        return x


@register("matav")
class MaTAV(ERCHead):
    """Paper sizes: 256-d alignment, six cross-attention layers, MEC weight 0.3 (§II, §III). `fusion_block`:
    transformer (default) | attention (eq. 6-7 literally); `normalize`: see `ERCHead.normalization`."""

    def __init__(self, dims, n_out, task, d_model: int = 256, d_proj: int = 256, attention_layers: int = 6,
                 heads: int = 4, mamba_layers: int = 1, state_size: int = 16, dropout: float = 0.1,
                 queue_size: int = 4096, momentum: float = 0.995, temperature: float = 1.0, mec_weight: float = 0.3,
                 mec_symmetric: bool = False, mamba: bool = True,
                 fusion_block: Literal["transformer", "attention"] = "transformer",
                 normalize: dict[Modality, Literal["standard", "none"]] | None = None):
        super().__init__(dims, n_out, task)
        self.mec_weight = mec_weight
        self.align = TAVAlignment(self.dims, d_proj, queue_size, momentum, temperature, mec_symmetric)
        # one map for every modality from the shared alignment space to d_model keeps MEC's geometry: what
        # MEC pulls together stays together in the tokens the cross-attention reads
        self.to_model = nn.Linear(d_proj, d_model)
        self.token_scale = d_proj ** 0.5   # unit-norm g_m(x) -> coordinates of unit scale
        if fusion_block not in ("transformer", "attention"):
            raise ValueError(f"MaTAV fusion_block: transformer | attention, not {fusion_block!r}")
        if fusion_block == "transformer":
            layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True)
            self.cross_attention = nn.TransformerEncoder(layer, attention_layers, enable_nested_tensor=False)
        else:
            self.cross_attention = AttentionStack(d_model, heads, attention_layers, dropout)   # eq. 6-7
        self.merge = nn.Linear(d_model * len(dims), d_model)           # f = W_F [t || a || v]
        self.fc = nn.Linear(d_model, d_model)                          # z_i = FC(f_i)
        self.mamba = MambaStack(d_model, mamba_layers, state_size) if mamba else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model, n_out)                    # eq. 8

    def real_turns(self, batch: DialogueBatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Features and validity of the real turns ([n_utt, d_m], [n_utt]); masked inputs zeroed."""
        m = batch.mask
        valid = {k: batch.valid[k][m] for k in self.modalities}
        return {k: batch.features[k][m] * valid[k][..., None] for k in self.modalities}, valid

    def forward(self, batch: DialogueBatch) -> torch.Tensor:
        # the per-utterance fusion runs on real turns only; Mamba then sees the padded dialogue
        batch = self.mix(batch)
        feats, valid = self.real_turns(batch)
        aligned = self.align(feats)                                    # g_m(x_m): what MEC aligns
        toks = torch.stack([self.to_model(aligned[k] * self.token_scale) for k in self.modalities], dim=1)
        ok = torch.stack([valid[k] for k in self.modalities], dim=1)   # [n_utt, n_mod]
        # a masked modality is no key of the attention and no part of f; an utterance with no valid
        # modality attends over its constant tokens (a fully masked softmax row would be NaN)
        ignore = ~ok & ok.any(1, keepdim=True)
        fused = self.cross_attention(toks, src_key_padding_mask=ignore) * ok[..., None]
        z = batch.padded(self.fc(self.merge(fused.flatten(1))))
        if self.mamba is not None:
            z = self.mamba(z, batch.mask)
        return self.classifier(self.dropout(z))

    def loss(self, batch: DialogueBatch, out: torch.Tensor):
        ce = self.task_loss(batch, out)
        parts = {"task": float(ce.detach())}
        if self.mec_weight and len(self.modalities) > 1:
            feats, valid = self.real_turns(self.mix(batch))   # MEC trains the layer mix too
            mec = self.align.loss(feats, valid, update=self.training)
            if mec is not None:
                parts["mec"] = float(mec.detach())
                return ce + self.mec_weight * mec, parts
        return ce, parts
