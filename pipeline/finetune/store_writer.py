"""A fine-tune's best checkpoint written as a feature store: `pooled` (the classifier's input, projected to the
teacher's size for a student) and `logits` for every split, with provenance (the checkpoint's content hash, the
base weights, the fine-tune config, and for a student its teacher store's fingerprint) — the contract of any
feature store, so a head takes it by naming it in params `features`. Under torchrun every rank computes its
share of the chunks and rank 0 assembles (pipeline/extract.py).

`FinetunedEncoder` is the checkpoint as an encoder; `FinetunedTextEncoder` the variant of a text checkpoint
fine-tuned on the labels (the text teacher), whose stores keep the provenance they were first written with.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.encoders import Encoder
from pipeline.extract import extract
from pipeline.finetune.lora import base_weights_hash
from pipeline.finetune.loop import Finetuner, params_identity
from pipeline.runtime import resolve_weights, weights_hash
from pipeline.store import atomic_write_text, fingerprint


class FinetunedEncoder(Encoder):
    """A fine-tuned checkpoint (loaded into `tuner`) as an encoder of kind `finetuned_<text|audio|video>`:
    `pooled`, `logits`, the inputs it masks and why; its provenance names the checkpoint (and content hash),
    the fine-tune config, the labels, the base weights (revision, content hash) and the objective (for a
    student, its teacher store)."""

    def __init__(self, name: str, tuner: Finetuner, checkpoint: Path, weights_dir: Path | None = None):
        """`checkpoint` as it is recorded (a project path); `weights_dir`: where it is here, when elsewhere."""
        self.name, self.tuner, self.checkpoint = name, tuner, checkpoint
        self.config = tuner.p
        self.ckpt_hash = weights_hash(str(weights_dir or checkpoint))
        self.kind, self.modality, self.needs_media = tuner.store_kind, tuner.modality, tuner.needs_media

    @property
    def dim(self) -> int:
        return int(self.tuner.model.dim)

    def checkpoint_provenance(self) -> dict:
        """The checkpoint, its config and labels: what every fine-tuned store records."""
        config = params_identity(self.config)   # an option at its neutral value leaves the store's identity as it was
        return {**super().provenance(), "config": config, "config_hash": fingerprint(config),
                "weights": str(self.checkpoint), "weights_hash": self.ckpt_hash,
                "base_weights": self.config.weights, "labels": self.tuner.labels}

    def provenance(self):
        base = resolve_weights(self.config.weights)
        if self.config.lora is not None:   # the base an adapter needs (also a hub id's cached snapshot)
            base_hash = getattr(self.tuner, "base_hash", None) or base_weights_hash(self.config.weights,
                                                                                    self.config.revision)
        else:
            base_hash = weights_hash(base)
        return {**self.checkpoint_provenance(), "base_weights_revision": self.config.revision,
                "base_weights_hash": base_hash, "objective": self.tuner.objective.name,
                **self.tuner.objective.provenance()}

    def encode(self, rows, manifest, media=None):
        idx = rows.index.to_numpy()
        pooled, logits = self.tuner.predict(idx)
        mine = set(rows["utt_id"])
        return ({"pooled": pooled, "logits": logits, "valid": self.tuner.usable[idx].copy()},
                [q for q in self.tuner.problems if q["utt_id"] in mine])


class FinetunedTextEncoder(FinetunedEncoder):
    """A text checkpoint fine-tuned on the labels (`ce`: the text teacher). Its stores were first written before
    the base weights' hash and the objective entered provenance, and record the checkpoint alone, so their
    fingerprints (and the heads trained on them) stay up to date."""
    kind, modality, needs_media = "finetuned_text", "text", False

    def provenance(self):
        return self.checkpoint_provenance()


def finetuned_encoder(name: str, tuner: Finetuner, checkpoint: Path, weights_dir: Path | None = None
                      ) -> FinetunedEncoder:
    """The encoder of `tuner`'s loaded checkpoint (recorded as `checkpoint`; `weights_dir`: where it is here)."""
    text_on_labels = tuner.kind == "hf_text" and tuner.objective.name == "ce" and tuner.p.lora is None
    return (FinetunedTextEncoder if text_on_labels else FinetunedEncoder)(name, tuner, checkpoint, weights_dir)


def write_store(tuner: Finetuner, name: str, out_path: str | Path, chunk_size: int = 512) -> dict:
    """Features + logits of the best checkpoint for every utterance (train/dev/test) -> feature store."""
    tuner.load("best")
    return extract(tuner.manifest, finetuned_encoder(name, tuner, tuner.ckpt / "best"), out_path, tuner.media_path,
                   chunk_size=chunk_size)


def finetune_to_store(tuner: Finetuner, name: str, out_path: str | Path, log=print) -> dict:
    """Train (or resume), write the store from the best checkpoint and its summary (`<store>.summary.json`)."""
    state = tuner.train(log=log)
    out = Path(out_path)
    summary = write_store(tuner, name, out)
    dev = tuner.evaluate("dev")
    report = {"best_epoch": state["best_epoch"], "dev_wf1": dev["wf1"], "dev_accuracy": dev["accuracy"],
              "steps": state["step"], "train_seconds": round(state.get("seconds", 0.0), 1),
              "global_batch": tuner.p.batch_size * tuner.ranks.world * tuner.p.grad_accum,
              "processes": tuner.ranks.world, "store": str(out), "history": state["history"]}
    log(f"{name}: best epoch {state['best_epoch']}, dev WF1 {dev['wf1']:.4f} -> {out}")
    summary = {**summary, "finetune": report}
    if tuner.ranks.main:   # beside the store, as extract's summary is
        atomic_write_text(out.with_suffix(".summary.json"), json.dumps(summary, indent=1))
    return summary
