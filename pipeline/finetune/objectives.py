"""What a fine-tune minimises, by params `finetune.<name>.objective`: the `OBJECTIVES` registry.

`ce` (`CrossEntropy`, here) is cross-entropy on the labels, optionally class-weighted. Other objectives register
themselves where they are defined: TelME's `telme_student` (CE + alpha DIST + beta feature KD against a teacher
store, arXiv 2401.12987 eq. 6-15) lives beside TelME's losses in heads/telme_students.py, so whoever runs a
student fine-tune imports that module first; an objective nobody registered is an `UnknownName` naming the
params key.

An objective also says what enters the fine-tune's fingerprint (`identity`: a re-run teacher re-trains its
students), what its store records (`provenance`), and the size of a projection before the classifier
(`teacher_dim`: a student is projected to its teacher's size).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.registry import Registry

OBJECTIVES: Registry[type["Objective"]] = Registry("fine-tune objective")


class Objective:
    """A fine-tune's loss on one batch, and what it adds to the run's identity and the store's provenance."""
    name: str                          # its params name, recorded in checkpoints and stores
    teacher_dim: int | None = None     # project the pooled vector to this size (a teacher's) before the classifier

    @classmethod
    def from_params(cls, p, manifest, teacher_store: str | Path | None = None) -> "Objective":
        """The objective of fine-tune params `p` on `manifest` (`teacher_store`: the store a student distils)."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What enters the fine-tune's fingerprint beside the params ({}: nothing)."""
        return {}

    def provenance(self) -> dict:
        """What the store records of the objective beside its name."""
        return {}

    def loss(self, rows: np.ndarray, pooled: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
             weight: torch.Tensor | None) -> torch.Tensor:
        """The loss of manifest rows `rows`: their pooled features [B, d], logits [B, C], labels [B]."""
        raise NotImplementedError


@OBJECTIVES.register("ce")
class CrossEntropy(Objective):
    """The `ce` objective: cross-entropy on the labels (optionally class-weighted). Its identity is empty, so
    the fingerprints of text teachers stay as they were before objectives existed."""
    name = "ce"

    @classmethod
    def from_params(cls, p, manifest, teacher_store=None) -> "CrossEntropy":
        return cls()

    def loss(self, rows, pooled, logits, y, weight):
        return F.cross_entropy(logits.float(), y, weight=weight)


def build_objective(p, manifest, where: str, teacher_store: str | Path | None = None) -> Objective:
    """The objective `p.objective` names (`where`: its params key, for the error when none is registered)."""
    return OBJECTIVES.get(p.objective, where).from_params(p, manifest, teacher_store)


class TrainedObjective(Objective):
    """The objective a checkpoint was trained with, known by its name and feature size only: enough to rebuild
    the model (a projection to `teacher_dim`) and predict with it (ercflow predict), not to train it."""

    def __init__(self, name: str, teacher_dim: int | None):
        self.name, self.teacher_dim = name, teacher_dim

    def loss(self, *_, **__):
        raise RuntimeError(f"a checkpoint rebuilt to predict cannot train (its objective {self.name} is not loaded)")
