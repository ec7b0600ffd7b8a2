"""Fine-tuning the text teacher once per dataset, then caching its features and logits as a feature store.

The papers' text branch is a fine-tuned encoder (DialogueTRM: BERT on `indi_context`; TelME: RoBERTa on
`prompt`, the teacher its students distil from). `finetune_text` trains `TextClassifier` (encoder + linear
layer on the pooled token) with AdamW, warmup + linear decay, gradient accumulation, optional class
weights, autocast on CUDA and gradient checkpointing, and stops early on dev weighted F1. Then the best
checkpoint writes the teacher store: `pooled` (the feature at the pooling position) and `logits`, for every
split, with the checkpoint's content hash as provenance — same contract as any feature store, so a head
takes it as its text input by naming it in params `features.text`.

Checkpoints (`<ckpt>/best`, `<ckpt>/last`) hold the encoder and tokenizer (with the added speaker tokens)
in transformers' format, the classifier layer, and — in `last` — optimizer, scheduler, RNG state and the
position in the epoch, so an interrupted fine-tune resumes where its last checkpoint left it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.encoders import Encoder, autocast_context, extract, resolve_device, weights_hash
from pipeline.encoders.text import load_text_model, pool_hidden, text_inputs, tokenize_pairs
from pipeline.manifest import Manifest
from pipeline.metrics import classification_metrics
from pipeline.store import atomic_write_text, fingerprint


@dataclass
class FinetuneParams:
    weights: str                          # hub id / local dir / package:<module>/<dir>
    revision: str | None = None
    input_format: str = "indi_context"    # indi_context (DialogueTRM) | prompt (TelME) | utterance
    pooling: str = "cls"                  # cls | mean | mask (prompt)
    context_window: int | None = None
    speaker_tokens: int = 9
    max_length: int = 256
    lr: float = 6e-6                      # DialogueTRM 6e-6 (1200 warmup steps); TelME 1e-5
    warmup_steps: int = 1200
    weight_decay: float = 0.01
    epochs: int = 10
    batch_size: int = 8
    grad_accum: int = 1
    patience: int = 3                     # epochs without dev WF1 improvement
    class_weights: bool = False           # inverse-frequency CE weights (MELD is 47% neutral)
    gradient_checkpointing: bool = False
    autocast: str = "bf16"                # CUDA only
    dropout: float = 0.1
    device: str = "auto"
    seed: int = 0
    save_every_steps: int = 200           # a resumable checkpoint this often (and at each epoch's end)
    eval_batch_size: int = 32


class TextClassifier(nn.Module):
    """Encoder + dropout + linear layer on the pooled token (the feature the teacher store keeps)."""

    def __init__(self, encoder, n_labels: int, pooling: str, mask_token_id: int | None, dropout: float):
        super().__init__()
        self.encoder, self.pooling, self.mask_token_id = encoder, pooling, mask_token_id
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, n_labels)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(**batch).last_hidden_state
        pooled = pool_hidden(hidden, batch, self.pooling, self.mask_token_id)
        return pooled, self.classifier(self.dropout(pooled))


class InterruptTraining(Exception):
    """Raised by a `stop_after_steps` hook (tests simulate a kill with it)."""


class TextFinetuner:
    def __init__(self, manifest: Manifest, p: FinetuneParams, ckpt_dir: str | Path):
        self.manifest, self.p, self.ckpt = manifest, p, Path(ckpt_dir)
        self.labels = manifest.meta.labels
        if not self.labels:
            raise ValueError("finetune_text needs categorical labels")
        self.device = resolve_device(p.device)
        self.fingerprint = fingerprint({"params": asdict(p), "labels": self.labels,
                                        "data": manifest.rows[["utt_id", "text", "label", "split"]].to_dict("list")})
        self.tokenizer, encoder = load_text_model(p.weights, p.revision, p.input_format, p.speaker_tokens)
        if p.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
        torch.manual_seed(p.seed)
        self.model = TextClassifier(encoder, len(self.labels), p.pooling, self.tokenizer.mask_token_id, p.dropout)
        self.model.to(self.device)
        rows = np.arange(len(manifest))
        pairs = text_inputs(manifest, rows, p.input_format, p.context_window, p.speaker_tokens,
                            sep=self.tokenizer.sep_token or "</s>", mask=self.tokenizer.mask_token or "<mask>")
        self.encoded = tokenize_pairs(self.tokenizer, pairs, p.input_format, p.max_length)
        self.y = manifest.label_index()
        split = manifest.rows["split"].to_numpy()
        self.rows = {s: rows[(split == s) & (self.y >= 0)] for s in ("train", "dev", "test")}

    # -- batches ----------------------------------------------------------------------------------
    def collate(self, rows: np.ndarray) -> dict:
        batch = self.tokenizer.pad([self.encoded[i] for i in rows], return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.p.seed + epoch).permutation(self.rows["train"])

    @torch.inference_mode()
    def predict(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pooled features, logits) of `rows`, in length-sorted batches, returned in `rows` order."""
        self.model.eval()
        d = self.model.encoder.config.hidden_size
        pooled, logits = np.zeros((len(rows), d), np.float32), np.zeros((len(rows), len(self.labels)), np.float32)
        order = np.argsort([len(self.encoded[i]["input_ids"]) for i in rows], kind="stable")
        for s in range(0, len(order), self.p.eval_batch_size):
            idx = order[s:s + self.p.eval_batch_size]
            with autocast_context(self.device, self.p.autocast):
                f, z = self.model(self.collate(rows[idx]))
            pooled[idx], logits[idx] = f.float().cpu().numpy(), z.float().cpu().numpy()
        return pooled, logits

    def evaluate(self, split: str) -> dict:
        _, logits = self.predict(self.rows[split])
        return classification_metrics(self.y[self.rows[split]], logits.argmax(1), self.labels)

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, name: str, state: dict | None = None) -> Path:
        """Write checkpoint `name` atomically (temp dir, then rename)."""
        final = self.ckpt / name
        tmp = self.ckpt / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.encoder.save_pretrained(tmp / "encoder")
        self.tokenizer.save_pretrained(tmp / "encoder")
        torch.save({"classifier": self.model.classifier.state_dict(), "labels": self.labels,
                    "pooling": self.p.pooling, "fingerprint": self.fingerprint}, tmp / "classifier.pt")
        if state is not None:
            torch.save(state, tmp / "training_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def load(self, name: str) -> dict | None:
        from transformers import AutoModel

        path = self.ckpt / name
        head = torch.load(path / "classifier.pt", map_location="cpu", weights_only=False)
        encoder = AutoModel.from_pretrained(path / "encoder")
        self.model.encoder.load_state_dict(encoder.state_dict())
        self.model.classifier.load_state_dict(head["classifier"])
        self.model.to(self.device)
        state = path / "training_state.pt"
        return torch.load(state, map_location="cpu", weights_only=False) if state.exists() else None

    def resumable(self) -> bool:
        head = self.ckpt / "last" / "classifier.pt"
        return head.exists() and torch.load(head, map_location="cpu", weights_only=False)["fingerprint"] == self.fingerprint

    # -- training ---------------------------------------------------------------------------------
    def train(self, log=print, stop_after_steps: int | None = None) -> dict:
        from transformers import get_linear_schedule_with_warmup

        p = self.p
        self.ckpt.mkdir(parents=True, exist_ok=True)
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
        groups = [{"params": [w for n, w in self.model.named_parameters() if not n.endswith(no_decay)],
                   "weight_decay": p.weight_decay},
                  {"params": [w for n, w in self.model.named_parameters() if n.endswith(no_decay)],
                   "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=p.lr)
        steps_per_epoch = -(-len(self.rows["train"]) // (p.batch_size * p.grad_accum))
        sched = get_linear_schedule_with_warmup(opt, min(p.warmup_steps, p.epochs * steps_per_epoch // 2),
                                                p.epochs * steps_per_epoch)
        weight = None
        if p.class_weights:
            counts = np.bincount(self.y[self.rows["train"]], minlength=len(self.labels)).astype(np.float64)
            weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32,
                                  device=self.device)
        state = {"epoch": 0, "batch": 0, "step": 0, "best": -1.0, "best_epoch": -1, "since": 0, "history": []}
        if self.resumable():
            saved = self.load("last")
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            torch.set_rng_state(saved["rng"])
            state = saved["state"]
            log(f"resuming from {self.ckpt / 'last'}: epoch {state['epoch']}, batch {state['batch']}, step {state['step']}")
        resumed_at = state["step"]

        def checkpoint():
            self.save("last", {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "rng": torch.get_rng_state(), "state": state})

        started = time.perf_counter()
        while state["epoch"] < p.epochs and state["since"] < p.patience:
            self.model.train()
            order = self.epoch_order(state["epoch"])
            batches = [order[s:s + p.batch_size] for s in range(0, len(order), p.batch_size)]
            losses = []
            for b in range(state["batch"], len(batches)):
                batch = self.collate(batches[b])
                with autocast_context(self.device, p.autocast):
                    _, logits = self.model(batch)
                loss = F.cross_entropy(logits.float(), torch.from_numpy(self.y[batches[b]]).to(self.device),
                                       weight=weight)
                (loss / p.grad_accum).backward()
                losses.append(float(loss.detach()))
                state["batch"] = b + 1
                if (b + 1) % p.grad_accum == 0 or b + 1 == len(batches):
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    state["step"] += 1
                    if p.save_every_steps and state["step"] % p.save_every_steps == 0:
                        checkpoint()
                    if stop_after_steps is not None and state["step"] - resumed_at >= stop_after_steps:
                        checkpoint()
                        raise InterruptTraining(f"stopped after {stop_after_steps} steps")
            dev = self.evaluate("dev")
            state["history"].append({"epoch": state["epoch"], "train_loss": float(np.mean(losses)) if losses else None,
                                     "dev_wf1": dev["wf1"]})
            log(f"epoch {state['epoch']}: train loss {state['history'][-1]['train_loss']}, dev WF1 {dev['wf1']:.4f}")
            if dev["wf1"] > state["best"]:
                state.update(best=dev["wf1"], best_epoch=state["epoch"], since=0)
                self.save("best")
            else:
                state["since"] += 1
            state["epoch"] += 1
            state["batch"] = 0
            checkpoint()
        state["seconds"] = time.perf_counter() - started
        atomic_write_text(self.ckpt / "history.json", json.dumps(state["history"], indent=1))
        return state


class TeacherEncoder(Encoder):
    """The fine-tuned checkpoint as an encoder: `pooled` at the pooling position and `logits`."""
    kind = "finetuned_text"
    modality = "text"
    needs_media = False

    def __init__(self, name: str, tuner: TextFinetuner, checkpoint: Path):
        self.name, self.tuner, self.checkpoint = name, tuner, checkpoint
        self.config = tuner.p
        self.ckpt_hash = weights_hash(str(checkpoint))

    @property
    def dim(self) -> int:
        return int(self.tuner.model.encoder.config.hidden_size)

    def provenance(self):
        return {**super().provenance(), "weights": str(self.checkpoint), "weights_hash": self.ckpt_hash,
                "base_weights": self.config.weights, "labels": self.tuner.labels}

    def encode(self, rows, manifest, media=None):
        pooled, logits = self.tuner.predict(rows.index.to_numpy())
        return {"pooled": pooled, "logits": logits, "valid": np.ones(len(rows), bool)}, []


def write_teacher_store(tuner: TextFinetuner, name: str, out_path: str | Path, chunk_size: int = 512) -> dict:
    """Features + logits of the best checkpoint for every utterance (train/dev/test) -> feature store."""
    tuner.load("best")
    return extract(tuner.manifest, TeacherEncoder(name, tuner, tuner.ckpt / "best"), out_path, chunk_size=chunk_size)
