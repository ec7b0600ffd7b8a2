"""Dialogue batches from cached feature stores (the input contract every head shares).

A batch holds B dialogues padded to the longest, L turns:
- `features[m]` [B, L, D_m] float per modality, standardised with train-split statistics or raw (as the head
  asks: its `normalize` option, `heads.registry.input_normalization`), zeros where the utterance is padding or
  its input was masked; `valid[m]` [B, L] bool says which; a modality whose store
  kept several encoder layers is [B, L, n_layers, D_m], each layer standardised on its own (the head's
  LayerMix, heads/layers.py, then weighs layers of comparable scale);
- `mask` [B, L] bool (real utterances), `speakers` [B, L] long (per-dialogue ids), `rows` [B, L] manifest
  rows (-1 on padding);
- `labels` [B, L] long class ids (-100 on padding / unlabelled) and `dims` [B, L, n_dims] float
  (NaN where absent) for dimensional targets.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.manifest import Manifest
from pipeline.store import FeatureStore

IGNORE = -100


@dataclass
class DialogueBatch:
    features: dict[str, torch.Tensor]
    valid: dict[str, torch.Tensor]
    mask: torch.Tensor
    speakers: torch.Tensor
    labels: torch.Tensor
    dims: torch.Tensor
    rows: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)   # e.g. teacher `logits`

    def padded(self, per_turn: torch.Tensor) -> torch.Tensor:
        """[n_real, C] values of the real turns (`x[batch.mask]` order) -> [B, L, C], zeros on padding."""
        out = per_turn.new_zeros(*self.mask.shape, per_turn.shape[-1])
        out[self.mask] = per_turn
        return out

    def to(self, device) -> "DialogueBatch":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return DialogueBatch(move(self.features), move(self.valid), self.mask.to(device), self.speakers.to(device),
                             self.labels.to(device), self.dims.to(device), self.rows.to(device), move(self.extra))


class CachedDialogues:
    """All rows of a manifest with the pooled features of each modality's store, held in memory.

    Features are standardised per dimension (per layer and dimension for a [N, L, D] store) with the train
    split's valid rows (`stats[m]` = (mean, std), each [D] or [L, D]), or with given `stats` — a trained
    model's own, so that new data is scaled exactly as its training data was. `normalize` is one choice for
    every modality or one per modality (modality -> bool; a head's choice, `heads.registry.input_normalization`);
    with `stats`, a modality absent from them is left raw, as the model was trained. `stats` holds the
    standardised modalities only. `layers[m]`: the hidden-state indices of a several-layer store."""

    def __init__(self, manifest: Manifest, stores: dict[str, str], normalize: bool | Mapping[str, bool] = True,
                 stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        self.manifest = manifest
        self.modalities = list(stores)
        self.labels = manifest.meta.labels
        self.dim_names = manifest.meta.dimensions
        ids = manifest.utt_ids
        self.features, self.valid, self.extra, self.provenance, self.stats = {}, {}, {}, {}, {}
        self.layers: dict[str, list[int]] = {}
        train = (manifest.rows["split"] == "train").to_numpy()
        for m, path in stores.items():
            with FeatureStore(path) as store:
                x = store.pooled(ids).astype(np.float32)
                ok = store.valid(ids).astype(bool)
                logits = store.logits(ids)
                scored = store.attrs.get("labels")
                if logits is not None and isinstance(scored, list) and scored != list(self.labels):
                    # a teacher's logits in another class order would be read as these classes, silently
                    raise ValueError(f"{path}: its logits score the classes {scored}, the manifest's are "
                                     f"{list(self.labels)} (in this order); re-run the stage that wrote it")
                self.provenance[m] = {k: store.attrs.get(k) for k in ("encoder", "weights", "weights_hash",
                                                                      "fingerprint")}
                if store.layers is not None:
                    self.layers[m] = store.layers
            bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)   # a NaN in any layer masks the row
            if bad.any():  # a NaN feature would poison every gradient: mask the utterance instead
                ok &= ~bad
                x[bad] = 0.0
            if (normalize.get(m, True) if isinstance(normalize, Mapping) else normalize) and \
                    (stats is None or m in stats):
                if stats is not None:
                    mean, std = (np.asarray(a, np.float32) for a in stats[m])
                else:
                    ref = x[train & ok] if (train & ok).any() else x[ok]
                    mean, std = ref.mean(0), np.where(ref.std(0) > 1e-6, ref.std(0), 1.0).astype(np.float32)
                if mean.shape != x.shape[1:]:
                    raise ValueError(f"{path}: features of shape {list(x.shape[1:])} per utterance, but the model "
                                     f"was trained on {list(mean.shape)} ones for {m} ([D], or [layers, D])")
                self.stats[m] = (mean, std)
                x = np.where(ok.reshape(-1, *[1] * (x.ndim - 1)), (x - mean) / std, 0.0).astype(np.float32)
            else:   # raw, but a masked input is still zeros
                x = np.where(ok.reshape(-1, *[1] * (x.ndim - 1)), x, 0.0).astype(np.float32)
            self.features[m], self.valid[m] = x, ok
            if logits is not None:
                self.extra[f"{m}_logits"] = logits.astype(np.float32)
        self.label_ids = manifest.label_index()
        self.dim_values = (manifest.rows[self.dim_names].to_numpy(np.float32) if self.dim_names
                           else np.zeros((len(manifest), 0), np.float32))
        self.speakers = manifest.speaker_index()

    def dim(self, modality: str) -> int | tuple[int, int]:
        """A modality's input size for `build_head`: D, or (layers, D) for a several-layer store."""
        shape = self.features[modality].shape[1:]
        return int(shape[0]) if len(shape) == 1 else tuple(int(s) for s in shape)

    def dialogues(self, split: str) -> list[np.ndarray]:
        return self.manifest.dialogues(split)

    def batch(self, dialogues: list[np.ndarray]) -> DialogueBatch:
        b, L = len(dialogues), max(len(d) for d in dialogues)
        rows = np.full((b, L), -1, np.int64)
        for i, d in enumerate(dialogues):
            rows[i, :len(d)] = d
        pad = rows < 0
        safe = np.where(pad, 0, rows)

        def gather(a, fill):
            out = a[safe]
            out[pad] = fill
            return torch.from_numpy(np.ascontiguousarray(out))

        labels = self.label_ids[safe]
        labels = np.where(pad | (labels < 0), IGNORE, labels)
        return DialogueBatch(
            features={m: gather(x, 0.0) for m, x in self.features.items()},
            valid={m: gather(v, False) for m, v in self.valid.items()},
            mask=torch.from_numpy(~pad), speakers=gather(self.speakers, 0),
            labels=torch.from_numpy(labels), dims=gather(self.dim_values, np.nan), rows=torch.from_numpy(rows),
            extra={k: gather(v, 0.0) for k, v in self.extra.items()})

    def batches(self, split: str, batch_dialogues: int, shuffle: bool = False, rng=None):
        dialogues = self.dialogues(split)
        order = (rng or np.random.default_rng()).permutation(len(dialogues)) if shuffle else np.arange(len(dialogues))
        for s in range(0, len(order), batch_dialogues):
            yield self.batch([dialogues[i] for i in order[s:s + batch_dialogues]])
