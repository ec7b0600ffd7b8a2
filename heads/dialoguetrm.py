"""DialogueTRM (Mao et al., 2021, arXiv:2010.07637 §4; docs/papers.md) on cached utterance features.

Intra-modal emotion dynamics (§4.1): one Transformer per modality over the dialogue, its attention mask
chosen per modality — context-dependent (conv-context window K, eq. 2-3) or context-free (eq. 4-6).
Inter-modal emotion dynamics (§4.2): MGIF — a GATE on every modality pair (prototype dependency, eq. 7-14),
then the gated vectors behind a learned CLS embedding through a Transformer (representation dependency,
eq. 15-16). Discriminator (§4.3, eq. 17-18): tanh hidden layer, softmax (categorical) or linear
(dimensional).

The text features are expected to carry the self dependency already (the `indi_context` input of eq. 1).
A masked (missing) modality takes no part: its turns are in no other turn's context, and its MGIF tokens
are left out of the attention (a GATE with one masked side passes the other side through whole).
Ablations (Tables 4-5) are options: `context` per modality, `fusion` = mgif | no_gate (w/o prototype
dependency) | no_transformer (w/o representation dependency: concat of the gated vectors) | additive |
concat | max.

The paper's Transformers are "PyTorch defaults" (§5.2): feed-forward width 2048 at d_model 768. `feedforward`
sets it; unset, it keeps the paper's ratio, 8/3 * d_model (2048 at 768, 171 at the demo's 64) rather than
PyTorch's fixed 2048, which would be 32 times a 64-d model.
"""
from __future__ import annotations

from itertools import combinations
from typing import Literal

import torch
from torch import nn

from heads import ERCHead, register
from heads.data import DialogueBatch
from pipeline.vocab import Modality, PositiveInt

FUSIONS = ("mgif", "no_gate", "no_transformer", "additive", "concat", "max")


def paper_feedforward(d_model: int) -> int:
    """PyTorch's default feed-forward width (2048) at the paper's d_model 768, in proportion elsewhere."""
    return max(1, round(2048 * d_model / 768))


def conv_context_mask(length: int, window: int, device=None) -> torch.Tensor:
    """Eq. 3: row i may attend to j iff max(0, i-K) <= j <= i (the K-turn conv-context and itself).

    Boolean [L, L], True = allowed. Every row allows its own position, so no row is masked everywhere
    (a fully masked softmax row is NaN) — also for padded turns, whose outputs are ignored."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & (j >= i - window)


def context_free_mask(length: int, device=None) -> torch.Tensor:
    """Eq. 6: each turn attends to itself only."""
    return torch.eye(length, dtype=torch.bool, device=device)


class IntraModalTransformer(nn.Module):
    """Eq. 2 / 4 / 5: r_i = Transformer(F, rho_i), after projecting the features to d_model."""

    def __init__(self, d_in: int, d_model: int, layers: int, heads: int, dropout: float, context: str, window: int,
                 feedforward: int):
        super().__init__()
        if context not in ("dependent", "free"):
            raise ValueError(f"DialogueTRM context must be 'dependent' or 'free', not {context!r}")
        self.context, self.window = context, window
        self.proj = nn.Linear(d_in, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B, L, d_in]; valid [B, L] bool. A masked turn (missing input or padding) is in no other turn's
        context; every turn still sees itself, so no attention row is empty."""
        B, L = valid.shape
        allowed = conv_context_mask(L, self.window, x.device) if self.context == "dependent" \
            else context_free_mask(L, x.device)
        allowed = allowed & (valid[:, None, :] | torch.eye(L, dtype=torch.bool, device=x.device))
        heads = self.encoder.layers[0].self_attn.num_heads
        return self.encoder(self.proj(x), mask=~allowed.repeat_interleave(heads, 0))   # True = not allowed


class GATE(nn.Module):
    """Eq. 7-12: h_u = tanh(W^U r_u), h_a = tanh(W^A r_a), z = sigmoid(W^Z [r_u; r_a]),
    returns (z * h_u, (1 - z) * h_a): a position-wise trade-off between the two vectors.

    With validity flags, a pair with one masked side gates nothing: z = 1 when only u is valid (h_u passes
    whole), z = 0 when only a is, so the masked side's vector never reaches the output."""

    def __init__(self, d: int):
        super().__init__()
        self.w_u, self.w_a, self.w_z = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(2 * d, d)

    def forward(self, r_u: torch.Tensor, r_a: torch.Tensor, ok_u: torch.Tensor | None = None,
                ok_a: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h_u, h_a = torch.tanh(self.w_u(r_u)), torch.tanh(self.w_a(r_a))
        z = torch.sigmoid(self.w_z(torch.cat([r_u, r_a], dim=-1)))
        if ok_u is not None:
            z = torch.where((ok_u & ok_a)[..., None], z, ok_u[..., None].to(z.dtype))
        return z * h_u, (1 - z) * h_a


class MGIF(nn.Module):
    """Eq. 13-16: GATE on each modality pair (u,a), (u,v), (a,v); M_i = [e_CLS, h_ua, h_au, h_uv, h_vu, h_av, h_va]
    through a Transformer with an all-ones mask; o_i is the output at e_CLS.

    `gate=False` is Table 5's w/o prototype dependency (the r_m themselves are the tokens);
    `transformer=False` is w/o representation dependency (o_i = concatenation of the gated vectors)."""

    def __init__(self, modalities: list[str], d: int, layers: int, heads: int, dropout: float,
                 gate: bool = True, transformer: bool = True, feedforward: int | None = None):
        super().__init__()
        self.pairs = list(combinations(modalities, 2))
        self.gate, self.transformer = gate, transformer
        self.gates = nn.ModuleDict({f"{a}_{b}": GATE(d) for a, b in self.pairs}) if gate else nn.ModuleDict()
        n_tokens = 2 * len(self.pairs) if gate else len(modalities)
        self.out_dim = d if transformer else n_tokens * d
        if transformer:
            self.cls = nn.Parameter(torch.randn(d) * 0.02)
            layer = nn.TransformerEncoderLayer(d, heads, feedforward or paper_feedforward(d), dropout,
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def tokens(self, reps: dict[str, torch.Tensor], valid: dict[str, torch.Tensor]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The fusion's tokens and their validity: h_ua belongs to u and is valid iff u is."""
        if not self.gate:
            return list(reps.values()), [valid[m] for m in reps]
        toks, ok = [], []
        for a, b in self.pairs:
            toks.extend(self.gates[f"{a}_{b}"](reps[a], reps[b], valid[a], valid[b]))
            ok.extend([valid[a], valid[b]])
        return toks, ok

    def forward(self, reps: dict[str, torch.Tensor], valid: dict[str, torch.Tensor]) -> torch.Tensor:
        """reps[m] [n, d], valid[m] [n] bool -> o [n, out_dim]; tokens of masked modalities are left out."""
        toks, ok = self.tokens(reps, valid)                       # each [n, d], [n]
        toks = [t * o[..., None] for t, o in zip(toks, ok)]
        if not self.transformer:
            return torch.cat(toks, dim=-1)
        seq = torch.stack([self.cls.expand_as(toks[0])] + toks, dim=1)          # [n, 1 + tokens, d]
        ignore = ~torch.stack([torch.ones_like(ok[0])] + ok, dim=1)             # e_CLS is always a key
        return self.encoder(seq, src_key_padding_mask=ignore)[:, 0]


class Discriminator(nn.Module):
    """Eq. 17-18: W^C tanh(W^O o) (softmax in the loss) for categorical, W^D tanh(W^O o) for dimensional."""

    def __init__(self, d_in: int, d_hidden: int, n_out: int):
        super().__init__()
        self.hidden, self.out = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, n_out)

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(o)))


@register("dialoguetrm")
class DialogueTRM(ERCHead):
    """Paper sizes: d_model 768, intra 6 layers x 12 heads, inter 4 layers x 8 heads, feed-forward 2048 (§5.2).

    `context`: modality -> dependent | free (default: text dependent, audio and visual free, §4.1); `feedforward`:
    the Transformers' feed-forward width (default `paper_feedforward(d_model)`); `normalize`: see
    `ERCHead.normalization`."""

    def __init__(self, dims, n_out, task, d_model: int = 768, intra_layers: int = 6, intra_heads: int = 12,
                 inter_layers: int = 4, inter_heads: int = 8, window: int = 14, dropout: float = 0.1,
                 context: dict[Modality, Literal["dependent", "free"]] | None = None,
                 fusion: Literal["mgif", "no_gate", "no_transformer", "additive", "concat", "max"] = "mgif",
                 feedforward: PositiveInt | None = None,
                 normalize: dict[Modality, Literal["standard", "none"]] | None = None):
        super().__init__(dims, n_out, task)
        if fusion not in FUSIONS:
            raise ValueError(f"DialogueTRM fusion must be one of {FUSIONS}, not {fusion!r}")
        context = {"text": "dependent", "audio": "free", "visual": "free", **(context or {})}
        self.fusion = fusion
        ff = feedforward or paper_feedforward(d_model)
        self.intra = nn.ModuleDict({m: IntraModalTransformer(d, d_model, intra_layers, intra_heads, dropout,
                                                             context[m], window, ff) for m, d in self.dims.items()})
        fused_dim = d_model
        if len(dims) > 1 and fusion.startswith(("mgif", "no_")):
            self.mgif = MGIF(self.modalities, d_model, inter_layers, inter_heads, dropout,
                             gate=fusion != "no_gate", transformer=fusion != "no_transformer", feedforward=ff)
            fused_dim = self.mgif.out_dim
        elif fusion == "concat":
            fused_dim = d_model * len(dims)
        self.discriminator = Discriminator(fused_dim, d_model, n_out)

    def forward(self, batch: DialogueBatch) -> torch.Tensor:
        batch = self.mix(batch)
        valid = {m: batch.valid[m] & batch.mask for m in self.modalities}
        reps = {m: self.intra[m](batch.features[m] * valid[m][..., None], valid[m]) for m in self.modalities}
        # fusion and discriminator are per utterance: run them on the real turns only, not on padding
        reps = {m: r[batch.mask] for m, r in reps.items()}
        valid = {m: v[batch.mask] for m, v in valid.items()}
        if len(reps) == 1:
            o = next(iter(reps.values()))            # DialogueTRM-U: no inter-modal fusion
        elif hasattr(self, "mgif"):
            o = self.mgif(reps, valid)
        else:                                        # Table 4's simple fusions, over the valid modalities
            ok = torch.stack([valid[m] for m in self.modalities])[..., None]      # [n_mod, n, 1]
            r = torch.stack([reps[m] for m in self.modalities])                    # [n_mod, n, d]
            if self.fusion == "additive":
                o = (r * ok).sum(0)
            elif self.fusion == "max":
                o = r.masked_fill(~ok, float("-inf")).amax(0)
                o = torch.where(torch.isfinite(o), o, torch.zeros_like(o))         # no valid modality
            else:
                o = (r * ok).permute(1, 0, 2).flatten(1)
        return batch.padded(self.discriminator(o))
