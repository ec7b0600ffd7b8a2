"""TelME's students: the fine-tune objective that trains an audio or visual encoder against a text teacher store
(Yun et al., 2024, arXiv:2401.12987, §3.2.3, eq. 6-15), registered into pipeline.finetune.objectives.OBJECTIVES
as `telme_student` (import this module before a student fine-tune is built or rebuilt):

    L_student = L_cls + alpha * L_response + beta * L_feature

L_response is DIST (eq. 7-12, `dist_loss`) between the student's and the teacher's logits, L_feature the KL
between teacher-teacher and student-teacher similarity distributions of the batch (eq. 13-15,
`feature_kd_loss`). Both come from heads/telme.py — one implementation of each equation, used by the `telme`
head's MLP students over frozen features and by these fine-tuned students alike — as do Table 9's alpha, beta,
tau per dataset (`paper_defaults: meld | iemocap`; explicit values win).

The teacher is a store with `logits` (the text teacher's, stage finetune_text): its logits Z^t and features
F_T are read once, in manifest order. Utterances the teacher store masks (empty text) take part in L_cls only.
The store's fingerprint enters the student's fingerprint and its store's provenance, so a re-run teacher makes
its students train again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from heads.telme import PAPER_DEFAULTS, dist_loss, feature_kd_loss
from pipeline.configs import FinetuneBase
from pipeline.finetune.objectives import OBJECTIVES, Objective
from pipeline.manifest import Manifest
from pipeline.params import ParamsError
from pipeline.store import FeatureStore

DEFAULTS = {"alpha": 1.0, "beta": 1.0, "tau_response": 2.0, "tau_feature": 1.0}   # the telme head's defaults
KNOBS = tuple(DEFAULTS)


def telme_weights(p: FinetuneBase) -> dict[str, float]:
    """alpha, beta, tau_response, tau_feature: explicit params, else Table 9's for `paper_defaults`, else the
    telme head's defaults."""
    preset = PAPER_DEFAULTS[p.paper_defaults] if p.paper_defaults else {}
    return {k: float(getattr(p, k) if getattr(p, k) is not None else preset.get(k, DEFAULTS[k])) for k in KNOBS}


def student_loss(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                 teacher_features: torch.Tensor, alpha: float, beta: float, tau_response: float, tau_feature: float,
                 teacher_valid: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 6 on one batch [B, C] / [B, d]: CE on every row, the KD terms on the rows the teacher has (two at
    least: both compare rows with each other); the teacher's tensors are targets (no gradient)."""
    loss = F.cross_entropy(logits.float(), labels, weight=weight)
    keep = teacher_valid if teacher_valid is not None else torch.ones(len(labels), dtype=torch.bool,
                                                                       device=labels.device)
    if int(keep.sum()) < 2:
        return loss
    if alpha:
        loss = loss + alpha * dist_loss(logits.float()[keep], teacher_logits[keep].detach(), tau_response)
    if beta:
        loss = loss + beta * feature_kd_loss(features.float()[keep], teacher_features[keep].detach(), tau_feature)
    return loss


@OBJECTIVES.register("telme_student")
class TelmeStudent(Objective):
    """The `telme_student` objective of a fine-tune (`build_finetuner(..., objective)`): eq. 6 against the
    teacher store at `teacher_store`, read for `manifest`'s utterances."""
    name = "telme_student"

    def __init__(self, teacher_store: str | Path, manifest: Manifest, p: FinetuneBase):
        self.path = Path(teacher_store)
        self.weights = telme_weights(p)
        if not self.path.exists():
            raise ParamsError(f"the teacher store {self.path} is missing: run the teacher's fine-tune first "
                              f"(stage finetune_text)")
        with FeatureStore(self.path) as store:
            store.require(manifest.utt_ids)
            logits = store.logits(manifest.utt_ids)
            if logits is None:
                raise ParamsError(f"{self.path}: has no logits: a telme_student distils a fine-tuned teacher's "
                                  "predictions (a store written by stage finetune_text)")
            labels = store.attrs.get("labels")
            if labels is not None and list(labels) != list(manifest.meta.labels):
                raise ParamsError(f"{self.path}: the teacher's labels {list(labels)} differ from the manifest's "
                                  f"{manifest.meta.labels}")
            pooled = store.pooled(manifest.utt_ids)
            if pooled.ndim != 2:
                raise ParamsError(f"{self.path}: a teacher store of one feature per utterance is needed "
                                  f"(this one keeps {pooled.shape[1]} layers)")
            self.fingerprint = store.attrs.get("fingerprint")
            valid = store.valid(manifest.utt_ids).astype(bool)
        self.logits = torch.from_numpy(np.ascontiguousarray(logits, np.float32))
        self.features = torch.from_numpy(np.ascontiguousarray(pooled, np.float32))
        self.valid = torch.from_numpy(valid)
        self.teacher_dim = int(pooled.shape[1])

    @classmethod
    def from_params(cls, p, manifest, teacher_store=None) -> "TelmeStudent":
        if teacher_store is None:
            raise ParamsError("objective telme_student: no teacher store (params distil.teacher names it)")
        return cls(teacher_store, manifest, p)

    def identity(self) -> dict:
        return {"objective": self.name, "teacher_fingerprint": self.fingerprint, **self.weights}

    def provenance(self) -> dict:
        return {"teacher_store": str(self.path), "teacher_fingerprint": self.fingerprint, "telme": self.weights}

    def loss(self, rows: np.ndarray, pooled: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
             weight: torch.Tensor | None) -> torch.Tensor:
        idx = torch.from_numpy(np.asarray(rows))
        dev = logits.device
        return student_loss(logits, pooled, y, self.logits[idx].to(dev), self.features[idx].to(dev),
                            teacher_valid=self.valid[idx].to(dev), weight=weight, **self.weights)
