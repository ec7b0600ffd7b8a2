"""A head's life cycle, shared by the train stage and the benches: seed -> build -> train, then the bundle
that `ercflow predict` and `load_model` read back (heads/bundle.py)."""
from __future__ import annotations

from heads import ERCHead
from heads.registry import build_head
from heads.bundle import save_head, store_recipe
from heads.data import CachedDialogues
from heads.trainer import TrainResult, seed_everything, train_head
from pipeline.params import HeadParams, TrainerParams


def fit_head(hp: HeadParams, trainer: TrainerParams, data: CachedDialogues, log=print) -> tuple[ERCHead, TrainResult]:
    """Build head `hp` for `data` and train it; the seed fixes its initial weights as well as the batches."""
    n_out = len(data.labels) if hp.task == "categorical" else len(data.dim_names)
    seed_everything(trainer.seed)
    head = build_head(hp.head, {m: data.dim(m) for m in hp.modalities}, n_out, hp.task, hp.options)
    return head, train_head(head, data, trainer, log=log)


def save_trained_head(path, name: str, hp: HeadParams, head: ERCHead, result: TrainResult, data: CachedDialogues,
                      stores: dict[str, str], media_path: str | None, **extra) -> None:
    """The model bundle: best weights, what built the head, the normalisation it was trained with and how each
    input store is computed on new data."""
    save_head(path, result.best_state, {
        "head": hp.head, "options": hp.options, "task": hp.task, "modalities": hp.modalities,
        "dims": dict(head.dims), "n_out": head.n_out, "labels": data.labels, "dimensions": data.dim_names,
        "features": {m: store_recipe(p, media_path) for m, p in stores.items()},
        "normalization": {m: {"mean": mean.tolist(), "std": std.tolist()} for m, (mean, std) in data.stats.items()},
        "layer_weights": layer_weights(head, data), "name": name, "best_epoch": result.best_epoch, **extra})


def layer_weights(head: ERCHead, data: CachedDialogues) -> dict[str, dict[str, float]]:
    """Per layered modality, its learned softmax weight by hidden-state index (`"0"`: the embeddings)."""
    return {m: {str(i): round(w, 6) for i, w in zip(data.layers.get(m, range(len(ws))), ws)}
            for m, ws in head.layer_weights().items()}
