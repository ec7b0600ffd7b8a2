"""The fine-tune loop shared by every kind (`Finetuner`): train, checkpoint, resume, predict, evaluate.

Training: AdamW, warmup + linear decay, gradient accumulation, optional class weights, autocast on CUDA,
gradient checkpointing, early stopping on dev weighted F1 (dev only: test is never looked at). `best` is
written at each dev improvement; `last` (with optimizer, scheduler, RNG states and the position in the epoch)
every `save_every_steps` steps and at each epoch's end, so an interrupted fine-tune resumes where `last` left
it, bit for bit (checkpoint format: pipeline/finetune/checkpoint.py). An epoch's batches are a function of the
seed and the epoch alone (pipeline/finetune/batches.py). A tqdm bar (pipeline/logs.py `progress`) shows the
step, the epoch's running loss, steps/s and the ETA.

Distributed (`procs: N`, or any torchrun launch; pipeline/distributed.py): DistributedDataParallel, gloo on a
CPU and NCCL-free (the gradients' all-reduce goes through the process group the stage joined). Every step sees
one *global* batch of batch_size x N inputs (x grad_accum micro-batches), rank r computing its every N-th
input; each rank's loss is weighted by its share of the global batch, so the averaged gradient is the one a
single process computes on the whole global batch (for `ce`; TelME's KD terms compare the inputs of a rank's
own share, as the paper's per-GPU batches do). The run's identity (fingerprint) holds the global batch, not N:
2 processes x 8 and 1 process x 16 are one run, and either resumes the other's `last` checkpoint exactly where
it stopped; rank 0 writes the checkpoints (with every rank's RNG state).

A kind (pipeline/finetune/kinds.py) loads the model and turns manifest rows into a batch.
"""
from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from pipeline import distributed
from pipeline.configs import RUN_ONLY, FinetuneBase
from pipeline.finetune.batches import MEGA_BATCH, length_grouped_batches, length_sorted_micro_batches
from pipeline.finetune.checkpoint import (load_checkpoint, read_checkpoint_meta, rng_states, save_checkpoint,
                                          set_rng_states)
from pipeline.finetune.live import LiveMetrics
from pipeline.finetune.models import Classifier
from pipeline.finetune.objectives import CrossEntropy, Objective
from pipeline.logs import progress
from pipeline.manifest import Manifest
from pipeline.metrics import classification_metrics
from pipeline.params import ParamsError
from pipeline.runtime import autocast_context, resolve_device
from pipeline.store import MediaStore, atomic_write_text, fingerprint

# options added after checkpoints and teacher stores were first written: at these values they are left out
# of the fingerprints, so an existing checkpoint / store stays valid (resumable, up to date)
NEUTRAL_ADDITIONS = {"group_by_length": False, "sort_micro_batches": False, "kind": "hf_text", "objective": "ce",
                     "paper_defaults": None, "alpha": None, "beta": None, "tau_response": None, "tau_feature": None,
                     "lora": None, "instruction": None, "label_words": None, "classifier": None}


def params_identity(p: FinetuneBase) -> dict:
    """The fine-tune params as they enter fingerprints and the store's `config` (less `procs`: how it runs, not
    what it computes; the global batch is in the run's identity)."""
    return {k: v for k, v in asdict(p).items()
            if k not in RUN_ONLY and not (k in NEUTRAL_ADDITIONS and v == NEUTRAL_ADDITIONS[k])}


def run_identity(p: FinetuneBase, world: int) -> dict:
    """`params_identity` with `batch_size` the global batch (batch_size x processes): the run's identity."""
    return {**params_identity(p), "batch_size": p.batch_size * world}


class InterruptTraining(Exception):
    """Raised by a `stop_after_steps` hook (tests simulate a kill with it)."""


class _NoBar:
    """The progress bar of a rank other than 0 (one bar per run)."""

    def update(self, *_):
        pass

    def set_postfix(self, *_, **__):
        pass

    def close(self):
        pass


class Finetuner:
    """The training loop, checkpoints and resume shared by every kind; a subclass loads the model and turns
    manifest rows into a batch (`setup`, `collate`), and says what of the data its fingerprint takes."""
    kind: ClassVar[str]          # finetune.<name>.kind
    modality: ClassVar[str]      # text | audio | visual
    store_kind: ClassVar[str]    # the store's encoder_kind
    needs_media: ClassVar[bool] = False
    mega_batch: ClassVar[int] = MEGA_BATCH
    model: Classifier

    def __init__(self, manifest: Manifest, p: FinetuneBase, ckpt_dir: str | Path, media_path: str | Path | None = None,
                 objective: Objective | None = None):
        if getattr(p, "kind", "hf_text") != self.kind:
            raise ParamsError(f"{type(self).__name__} fine-tunes kind {self.kind}, not {getattr(p, 'kind', None)}")
        self.manifest, self.p, self.ckpt = manifest, p, Path(ckpt_dir)
        self.labels = manifest.meta.labels
        if not self.labels:
            raise ValueError("fine-tuning needs categorical labels")
        if self.needs_media and media_path is None:
            raise ValueError(f"a {self.kind} fine-tune needs the media store")
        self.media_path = Path(media_path) if media_path is not None else None
        self.media = MediaStore(self.media_path) if self.needs_media else None
        self.objective = objective or CrossEntropy()
        self.ranks = distributed.ranks()
        self.device = resolve_device(p.device)
        self.y = manifest.label_index()
        self.problems: list[dict] = []
        rows = np.arange(len(manifest))
        self.usable = np.ones(len(manifest), bool)   # rows with an input (audio/video kept at decode, not silent)
        self.setup()
        identity = {"params": run_identity(p, self.ranks.world), "labels": self.labels, "data": self.data_identity()}
        if self.objective.identity():
            identity["objective"] = self.objective.identity()
        self.fingerprint = fingerprint(identity)
        split = manifest.rows["split"].to_numpy()
        self.rows = {s: rows[(split == s) & (self.y >= 0) & self.usable] for s in ("train", "dev", "test")}

    # -- what a kind provides -----------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the model (`self.model`, a `Classifier`), and set `self.lengths` (per manifest row: what
        length-grouped batches sort by), `self.usable` and `self.problems`."""
        raise NotImplementedError

    def collate(self, rows: np.ndarray) -> dict:
        """The model's input for manifest rows `rows`, on the device."""
        raise NotImplementedError

    def data_identity(self) -> dict | str:
        """What of the data the fingerprint takes (a fine-tune of other data starts over)."""
        raise NotImplementedError

    def save_encoder_extras(self, path: Path) -> None:
        """Save what the encoder needs beside its weights (tokenizer, processor) into `path`."""

    def checkpoint_info(self) -> dict:
        """What checkpoint.json says of the model beside labels and weights."""
        return {"kind": self.kind, "objective": self.objective.name}

    def d_out(self) -> int | None:
        return self.objective.teacher_dim

    def gradient_checkpointing(self, encoder) -> None:
        if not self.p.gradient_checkpointing:
            return
        if not getattr(encoder, "supports_gradient_checkpointing", False):
            raise ParamsError(f"finetune: {type(encoder).__name__} does not support gradient checkpointing "
                              "(set gradient_checkpointing: false)")
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def close(self) -> None:
        if self.media is not None:
            self.media.close()
            self.media = None

    # -- batches ------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches (batch_size x processes rows each): a function of the seed and the epoch
        alone, so a resumed run meets the very batches the interrupted one would have."""
        rng = np.random.default_rng(self.p.seed + epoch)
        order, bs = rng.permutation(self.rows["train"]), self.p.batch_size * self.ranks.world
        if self.p.group_by_length:
            return length_grouped_batches(order, self.lengths, bs, rng, self.mega_batch)
        if self.p.sort_micro_batches:
            return length_sorted_micro_batches(order, self.lengths, bs, self.p.grad_accum)
        return [order[s:s + bs] for s in range(0, len(order), bs)]

    @torch.inference_mode()
    def predict(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pooled features, logits) of `rows`, in length-sorted batches, returned in `rows` order; rows
        without a usable input get zeros."""
        self.model.eval()
        d = self.model.dim
        pooled, logits = np.zeros((len(rows), d), np.float32), np.zeros((len(rows), len(self.labels)), np.float32)
        keep = np.flatnonzero(self.usable[rows])
        order = keep[np.argsort(self.lengths[rows[keep]], kind="stable")]
        for s in range(0, len(order), self.p.eval_batch_size):
            idx = order[s:s + self.p.eval_batch_size]
            with autocast_context(self.device, self.p.autocast):
                f, z = self.model(self.collate(rows[idx]))
            pooled[idx], logits[idx] = f.float().cpu().numpy(), z.float().cpu().numpy()
        return pooled, logits

    def gathered_logits(self, rows: np.ndarray) -> np.ndarray:
        """Logits of `rows`; under torchrun each rank predicts its every N-th row and every rank gets them all."""
        r = self.ranks
        if not r.distributed:
            return self.predict(rows)[1]
        import torch.distributed as dist

        parts = [None] * r.world
        dist.all_gather_object(parts, self.predict(rows[r.rank::r.world])[1])
        out = np.zeros((len(rows), len(self.labels)), np.float32)
        for k, part in enumerate(parts):
            out[k::r.world] = part
        return out

    def evaluate(self, split: str) -> dict:
        logits = self.gathered_logits(self.rows[split])
        return classification_metrics(self.y[self.rows[split]], logits.argmax(1), self.labels)

    # -- checkpoints (the format: pipeline/finetune/checkpoint.py) ------------------------------------------
    def save(self, name: str, state: dict | None = None) -> Path:
        """Write checkpoint `name` atomically; `state`: the training state of `last`."""
        info = {"labels": self.labels, **self.checkpoint_info(), "base_weights": self.p.weights,
                "fingerprint": self.fingerprint}
        if self.p.lora is not None:   # an adapter: usable on these very base weights only (pipeline/finetune/lora.py)
            info["base_weights_hash"] = self.base_hash
        return save_checkpoint(self.ckpt / name, self.model, self.kind, info, state, self.save_encoder_extras)

    def checkpoint_meta(self, name: str) -> dict:
        """`checkpoint.json` of checkpoint `name`, after refusing a pickled, foreign or newer-format one."""
        return read_checkpoint_meta(self.ckpt / name, self.kind)

    def load(self, name: str) -> dict | None:
        """Load checkpoint `name` into the model; returns its training state (None for `best`)."""
        state = load_checkpoint(self.ckpt / name, self.model, self.kind, self.labels, self.p.lora,
                                getattr(self, "base_hash", None))
        self.model.to(self.device)
        return state

    def resumable(self) -> bool:
        """A `last` checkpoint of this very config exists (a pickled or damaged one is refused, not skipped)."""
        if not (self.ckpt / "last").exists():
            return False
        meta = self.checkpoint_meta("last")
        return bool(meta.get("training_state")) and meta.get("fingerprint") == self.fingerprint

    # -- training -------------------------------------------------------------------------------------------
    def class_weight(self) -> torch.Tensor | None:
        if not self.p.class_weights:
            return None
        counts = np.bincount(self.y[self.rows["train"]], minlength=len(self.labels)).astype(np.float64)
        return torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32,
                            device=self.device)

    def train(self, log=print, stop_after_steps: int | None = None) -> dict:
        from transformers import get_linear_schedule_with_warmup

        p, r = self.p, self.ranks
        self.ckpt.mkdir(parents=True, exist_ok=True)
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
        groups = [{"params": [w for n, w in self.model.named_parameters() if not n.endswith(no_decay)],
                   "weight_decay": p.weight_decay},
                  {"params": [w for n, w in self.model.named_parameters() if n.endswith(no_decay)],
                   "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=p.lr)
        steps_per_epoch = -(-len(self.rows["train"]) // (p.batch_size * r.world * p.grad_accum))
        sched = get_linear_schedule_with_warmup(opt, min(p.warmup_steps, p.epochs * steps_per_epoch // 2),
                                                p.epochs * steps_per_epoch)
        weight = self.class_weight()
        y_all = torch.from_numpy(np.array(self.y, np.int64))
        state = {"epoch": 0, "batch": 0, "step": 0, "best": -1.0, "best_epoch": -1, "since": 0, "history": []}
        # numpy's and Python's global RNGs from the seed too: speech models draw their SpecAugment time masks
        # with numpy's (transformers' _compute_mask_indices); a resumed run restores all of them instead
        np.random.seed(p.seed)
        random.seed(p.seed)
        if self.resumable():
            saved = self.load("last")
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            by_rank = saved.get("rng_ranks") or []
            set_rng_states(by_rank[r.rank] if r.rank < len(by_rank) else saved["rng"])
            state = saved["state"]
            log(f"resuming from {self.ckpt / 'last'}: epoch {state['epoch']}, batch {state['batch']}, step {state['step']}")
        resumed_at = state["step"]
        live = LiveMetrics(self.ckpt, resumed_at, enabled=r.main,   # dvc plots while it runs (optional)
                           epoch_done=state["batch"] == 0)
        net = self.model
        if r.distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                          else None, find_unused_parameters=True)

        def checkpoint():
            rngs = rng_states()
            doc = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs, "state": state}
            if r.distributed:   # every rank's RNG state (dropout draws differ between ranks)
                import torch.distributed as dist

                every = [None] * r.world
                dist.all_gather_object(every, rngs)
                doc["rng_ranks"] = every
            if r.main:
                self.save("last", doc)

        started = time.perf_counter()
        bar = progress(total=p.epochs * steps_per_epoch, initial=state["step"], desc=f"fine-tune {self.ckpt.name}",
                       unit="step", dynamic_ncols=True) if r.main else _NoBar()
        try:
            while state["epoch"] < p.epochs and state["since"] < p.patience:
                self.model.train()
                batches = self.epoch_batches(state["epoch"])
                # the epoch's loss sum / count and train seconds so far (kept in `last`, so a resumed epoch
                # reports its whole mean loss and time, less the work lost with the interruption)
                tally = state.setdefault("epoch_tally", {"loss": 0.0, "batches": 0, "seconds": 0.0})
                t0 = time.perf_counter()
                bar.set_postfix(epoch=state["epoch"], refresh=False)
                for b in range(state["batch"], len(batches)):
                    rows, share = self.my_share(batches[b], weight)
                    last_micro = (b + 1) % p.grad_accum == 0 or b + 1 == len(batches)
                    # a micro-batch's loss weighs by its share of the step's rows: the step's loss is the mean
                    # over its rows (1 / grad_accum each in a full step; the epoch's last step may be shorter)
                    first = b - b % p.grad_accum
                    micro = len(batches[b]) / sum(len(x) for x in batches[first:first + p.grad_accum])
                    with (net.no_sync() if r.distributed and not last_micro else nullcontext()):
                        batch = self.collate(rows)
                        with autocast_context(self.device, p.autocast):
                            pooled, logits = net(batch)
                        loss = self.objective.loss(rows, pooled, logits, y_all[rows].to(self.device), weight)
                        ((loss * share if r.distributed else loss) * micro).backward()
                    tally["loss"] += float(loss.detach())
                    tally["batches"] += 1
                    state["batch"] = b + 1
                    if last_micro:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                        opt.step()
                        sched.step()
                        opt.zero_grad(set_to_none=True)
                        state["step"] += 1
                        bar.update(1)
                        bar.set_postfix(epoch=state["epoch"], loss=f"{tally['loss'] / tally['batches']:.4f}",
                                        refresh=False)
                        live.step(state["step"], tally["loss"] / tally["batches"])
                        if p.save_every_steps and state["step"] % p.save_every_steps == 0:
                            tally["seconds"] += time.perf_counter() - t0
                            t0 = time.perf_counter()
                            checkpoint()
                        if stop_after_steps is not None and state["step"] - resumed_at >= stop_after_steps:
                            tally["seconds"] += time.perf_counter() - t0
                            checkpoint()
                            raise InterruptTraining(f"stopped after {stop_after_steps} steps")
                tally["seconds"] += time.perf_counter() - t0
                t1 = time.perf_counter()
                dev = self.evaluate("dev")
                entry = {"epoch": state["epoch"],
                         "train_loss": tally["loss"] / tally["batches"] if tally["batches"] else None,
                         "dev_wf1": dev["wf1"], "train_seconds": round(tally["seconds"], 2),
                         "eval_seconds": round(time.perf_counter() - t1, 2)}
                state["history"].append(entry)
                live.epoch(state["step"], entry)
                epoch_total = -(-len(batches) // p.grad_accum)
                rate = f", {epoch_total / tally['seconds']:.2f} steps/s" if tally["seconds"] > 0 else ""
                if r.main:
                    log(f"epoch {state['epoch']}: train loss {entry['train_loss']}, dev WF1 {dev['wf1']:.4f} "
                        f"(train {entry['train_seconds']:.0f} s{rate}, dev {entry['eval_seconds']:.0f} s)")
                if dev["wf1"] > state["best"]:
                    state.update(best=dev["wf1"], best_epoch=state["epoch"], since=0)
                    if r.main:
                        self.save("best")
                else:
                    state["since"] += 1
                state["epoch"] += 1
                state["batch"] = 0
                state.pop("epoch_tally")
                checkpoint()
        finally:
            bar.close()
            live.close()
        distributed.barrier(r, f"the end of fine-tune {self.ckpt}")   # rank 0's `best` is written
        state["seconds"] = time.perf_counter() - started
        if r.main:
            atomic_write_text(self.ckpt / "history.json", json.dumps(state["history"], indent=1))
        return state

    def my_share(self, rows: np.ndarray, weight: torch.Tensor | None) -> tuple[np.ndarray, float]:
        """This rank's rows of a global batch (every N-th) and the factor that makes the average of the N ranks'
        losses the loss of the whole batch: N x (this share's CE weight) / (the batch's). A rank left without
        rows (a last batch smaller than N) computes its first row at weight 0, so every rank takes part in the
        gradients' all-reduce."""
        r = self.ranks
        if not r.distributed:
            return rows, 1.0
        mine = rows[r.rank::r.world]
        if not len(mine):
            return rows[:1], 0.0
        w = (weight.cpu().numpy()[self.y[rows]] if weight is not None else np.ones(len(rows)))
        return mine, float(r.world * w[r.rank::r.world].sum() / w.sum())
