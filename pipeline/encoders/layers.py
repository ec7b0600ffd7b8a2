"""Which hidden layers a transformers encoder keeps: the `layers` option of `hf_text`, `hf_audio`, `hf_video`.

- `last` (default): the model's output (`last_hidden_state`), a store `pooled` [N, D] exactly as before the
  option existed: `layers` is left out of the store's provenance, so existing stores keep their fingerprints.
- `all`: every entry of transformers' `hidden_states` (index 0 is the embedding output, index i the output of
  layer i, num_hidden_layers + 1 entries).
- `[i, j, ...]`: those `hidden_states` indices (negative ones count from the end: -1 is the last layer).

One layer gives `pooled` [N, D]; several give `pooled` [N, L, D] (layers in the order given), and the store's
`layers` attribute lists the resolved indices (pipeline/store/). Downstream, heads learn a softmax-weighted
sum of the layers (heads/layers.py, as SUPERB does: arXiv:2105.01051).

An entry of `hidden_states` is what transformers returns there. For BERT-like models and most speech models
the last entry equals `last_hidden_state`; models with a LayerNorm after their last block (TimeSformer, VideoMAE
without mean pooling, speech models with `do_stable_layer_norm` such as WavLM-large) report the last block's
output before that norm, so `layers: [-1]` differs from `layers: last` there.
"""
from __future__ import annotations

from typing import Any

from pipeline.params import ParamsError
from pipeline.store import fingerprint


def resolve_layers(spec, n_layers: int, where: str, legacy_layer: int = -1) -> list[int] | None:
    """`hidden_states` indices of a `layers` option for a model of `n_layers` layers (n_layers + 1 hidden states),
    or None for `last` (the model's output). `legacy_layer`: hf_audio's older `layer: k`, the same as `[k]`."""
    n_states = n_layers + 1
    if legacy_layer != -1:
        if spec != "last":
            raise ParamsError(f"{where}: give `layers` only (`layer: {legacy_layer}` is the older spelling of "
                              f"`layers: [{legacy_layer}]`)")
        spec = [legacy_layer]
    if spec == "last":
        return None
    if spec == "all":
        return list(range(n_states))
    if isinstance(spec, str) or not spec:
        raise ParamsError(f"{where}.layers: last | all | a list of hidden_states indices, not {spec!r}")
    bad = [i for i in spec if not -n_states <= int(i) < n_states]
    if bad:
        raise ParamsError(f"{where}.layers: {bad} out of range: the model has {n_states} hidden states "
                          f"(0 = embeddings .. {n_layers} = last layer; -1 = the last)")
    out = [int(i) % n_states for i in spec]
    if len(set(out)) != len(out):
        raise ParamsError(f"{where}.layers: {list(spec)} names a layer twice ({out} as indices 0..{n_layers})")
    return out


def layer_provenance(prov: dict[str, Any], config, layers: list[int] | None) -> dict[str, Any]:
    """The encoder's provenance with its layer choice `layers` (resolved indices): `layers: last` is left out
    of `config` (and so of `config_hash` and the store's fingerprint, which stores built before the option
    existed were computed without: also hf_audio's older `layer: k`); any other choice stays in `config` and
    its resolved indices are the store's `layers` attribute."""
    if getattr(config, "layers", "last") == "last":
        cfg = {k: v for k, v in prov["config"].items() if k != "layers"}
        return {**prov, "config": cfg, "config_hash": fingerprint(cfg)}
    return {**prov, "layers": list(layers)}


def n_hidden_layers(model_config) -> int:
    """The number of layers of a transformers model from its config (hidden_states has one more entry)."""
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(getattr(model_config, key, None), int):
            return int(getattr(model_config, key))
    raise ParamsError(f"{type(model_config).__name__}: no num_hidden_layers in the model's config: "
                      "cannot select hidden layers (use layers: last)")


class HiddenLayers:
    """For an `HFEncoder` whose config has `layers`: the kept hidden states, and the provenance that records
    them. `provenance` resolves the layers from the config and the model's config only, so `ercflow inspect`
    (which runs it on a stand-in without weights) plans the same fingerprint."""

    hidden_layers: list[int] | None = None   # resolved indices; None: the model's output (`layers: last`)

    def kept_layers(self) -> list[int] | None:
        return resolve_layers(self.config.layers, n_hidden_layers(self.model.config), f"encoders.{self.name}",
                              getattr(self.config, "layer", -1))

    def provenance(self) -> dict[str, Any]:
        return layer_provenance(super().provenance(), self.config, self.kept_layers())

    @property
    def n_kept(self) -> int:
        return 1 if self.hidden_layers is None else len(self.hidden_layers)

    @property
    def pooled_shape(self) -> tuple[int, ...]:
        """One row of `pooled`: (D,) for one layer, (L, D) for several."""
        return (self.dim,) if self.n_kept == 1 else (self.n_kept, self.dim)

    def model_kwargs(self) -> dict[str, Any]:
        return {"output_hidden_states": True} if self.hidden_layers is not None else {}

    def kept_states(self, out) -> list:
        """The model output's kept hidden states, each [B, T, D] (float32)."""
        if self.hidden_layers is None:
            return [out.last_hidden_state.float()]
        return [out.hidden_states[i].float() for i in self.hidden_layers]

    def stack(self, per_layer: list):
        """Per-layer tensors [..., D] -> [..., D] (one layer) or [..., L, D] (several)."""
        import torch

        return per_layer[0] if len(per_layer) == 1 else torch.stack(per_layer, dim=-2)
