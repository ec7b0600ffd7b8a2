"""The shared trainer: dialogue batches, AdamW with warmup + linear decay, early stopping on dev.

Model selection uses the dev split only (weighted F1, or mean Pearson r for dimensional targets); the test
split is evaluated once, with the selected checkpoint.
"""
from __future__ import annotations

import copy
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from heads import ERCHead, class_weights
from heads.data import CachedDialogues
from pipeline.metrics import classification_metrics, regression_metrics
from pipeline.params import TrainerParams
from pipeline.runtime import resolve_device


@dataclass
class TrainResult:
    best_epoch: int
    best_state: dict
    curves: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)           # {"dev": {...}, "test": {...}}
    predictions: dict = field(default_factory=dict)       # split -> (manifest rows, raw outputs [n, C])
    seconds_per_epoch: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(head: ERCHead, data: CachedDialogues, split: str, batch_dialogues: int, device) -> tuple:
    """(manifest rows, outputs [n, C]) of every real utterance of `split`."""
    head.eval()
    rows, outs = [], []
    for batch in data.batches(split, batch_dialogues):
        batch = batch.to(device)
        out = head(batch)
        rows.append(batch.rows[batch.mask].cpu().numpy())
        outs.append(out[batch.mask].float().cpu().numpy())
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, head.n_out), np.float32)
    return np.concatenate(rows), np.concatenate(outs)


def evaluate(head: ERCHead, data: CachedDialogues, split: str, batch_dialogues: int, device) -> tuple[dict, tuple]:
    """(metrics, (manifest rows, raw outputs [n, C])) of `split`; unlabelled rows are not scored."""
    rows, out = predict(head, data, split, batch_dialogues, device)
    if head.task == "categorical":
        y = data.label_ids[rows]
        keep = y >= 0
        return classification_metrics(y[keep], out[keep].argmax(1), data.labels), (rows, out)
    return regression_metrics(data.dim_values[rows], out, data.dim_names), (rows, out)


def selection_score(head: ERCHead, metrics: dict) -> float:
    return metrics["wf1"] if head.task == "categorical" else metrics["mean_r"]


@contextmanager
def cpu_threads(n: int, device: torch.device):
    """torch's intra-op threads set to `n` while a head trains on the CPU, restored after (0, or a GPU: left
    as they are). A head's ops are small: a second thread buys 1.4-1.6x on an idle 2-core machine, but on a
    busy one every parallel op waits for a core and one thread is 1.5-4.6x faster (docs/benchmarks.md)."""
    if not n or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_head(head: ERCHead, data: CachedDialogues, p: TrainerParams, log=print) -> TrainResult:
    with cpu_threads(p.threads, resolve_device(p.device)):
        return _train_head(head, data, p, log)


def _train_head(head: ERCHead, data: CachedDialogues, p: TrainerParams, log) -> TrainResult:
    seed_everything(p.seed)
    device = resolve_device(p.device)
    head.prepare(data)
    if head.task == "categorical":
        y = data.label_ids[(data.manifest.rows["split"] == "train").to_numpy()]
        counts = np.bincount(y[y >= 0], minlength=len(data.labels))
        head.set_task_loss(class_weights(counts, p.class_weights), p.focal_gamma)
    head.to(device)
    if not data.dialogues("dev"):
        raise ValueError("the manifest has no dev split: early stopping needs one (never select on test)")
    from transformers import get_linear_schedule_with_warmup

    n_batches = -(-len(data.dialogues("train")) // p.batch_dialogues)
    opt = torch.optim.AdamW(head.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    total = max(1, p.epochs * n_batches)
    sched = get_linear_schedule_with_warmup(opt, int(p.warmup_ratio * total), total)
    rng = np.random.default_rng(p.seed)
    best, best_epoch, best_state, since, curves = -np.inf, -1, None, 0, []
    started = time.perf_counter()
    epochs_run = 0
    for epoch in range(p.epochs):
        head.train()
        losses = []
        for batch in data.batches("train", p.batch_dialogues, shuffle=True, rng=rng):
            batch = batch.to(device)
            out = head(batch)
            loss, parts = head.loss(batch, out)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}: loss is {float(loss)} ({parts})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip:
                torch.nn.utils.clip_grad_norm_(head.parameters(), p.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        dev, _ = evaluate(head, data, "dev", p.batch_dialogues, device)
        score = selection_score(head, dev)
        curves.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "dev_score": score})
        log(f"epoch {epoch:3d}  train loss {np.mean(losses):.4f}  dev {'wf1' if head.task == 'categorical' else 'r'} {score:.4f}")
        epochs_run += 1
        if score > best:
            best, best_epoch, since = score, epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in head.state_dict().items()})
        else:
            since += 1
            if since >= p.patience:
                log(f"early stop: no dev improvement for {p.patience} epochs (best epoch {best_epoch})")
                break
    elapsed = time.perf_counter() - started
    head.load_state_dict(best_state)
    result = TrainResult(best_epoch=best_epoch, best_state=best_state, curves=curves,
                         seconds_per_epoch=elapsed / max(1, epochs_run))
    for split in ("dev", "test"):
        if data.dialogues(split):
            result.metrics[split], result.predictions[split] = evaluate(head, data, split, p.batch_dialogues, device)
    return result
