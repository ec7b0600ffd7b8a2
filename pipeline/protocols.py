"""Evaluation protocols as data: which rows of a manifest train, select (dev) and test in each fold, and which
classes are scored.

- `official`: the manifest's own `split` column, one fold named `official` (MELD's, the ERC papers' IEMOCAP
  sessions 1-4 / 5);
- `leave_one_group_out`: each group the test fold once (IEMOCAP `group: session`, the speech community's
  leave-one-session-out 5-fold cross-validation: SUPERB arXiv:2105.01051, EmoBox arXiv:2406.07162);
- `kfold`: `folds` folds of groups (default: dialogues), sizes balanced by utterance count.

In every fold of a cross-validation the dev split is `dev_fraction` of the *training* dialogues, drawn with
`seed` and the fold's number (as the IEMOCAP adapter draws it from sessions 1-4): never from the test group.
A group is a set of whole dialogues (a dialogue never spans two folds' test splits), so the utterances of a
conversation, which share speakers and context, never sit on both sides of a split.

A label map merges or drops classes (IEMOCAP-4: excited -> happy; frustrated dropped): on a manifest before
training (`LabelMap.apply`), or on a prediction table before scoring (`LabelMap.map_table`, for a model
trained on other classes: cross-corpus evaluation).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import numpy as np
import pandas as pd

from pipeline import UserError
from pipeline.manifest import Manifest, _natural_key
from pipeline.params.evaluation import IEMOCAP4, NAMED_GROUPS, PRESETS, ProtocolParams, resolve_protocol


class ProtocolError(UserError, ValueError):
    pass


# the protocol's params live in the params package (every stage reads params; only these read manifests)
__all__ = ["IEMOCAP4", "NAMED_GROUPS", "PRESETS", "LabelMap", "ProtocolError", "ProtocolParams", "apply_fold",
           "fold_name", "fold_splits", "groups_of", "resolve_protocol"]


def fold_name(text: str) -> str:
    """A fold's name as it will name files and DVC stages (letters, digits, _ . -)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def groups_of(rows: pd.DataFrame, protocol: ProtocolParams, where: str = "protocol") -> pd.Series:
    """The group of each row (a string); a `ProtocolError` naming `where` when a dialogue spans two groups or
    a value does not match the pattern."""
    column, pattern = NAMED_GROUPS.get(protocol.group, (protocol.group, None))
    pattern = protocol.group_pattern or pattern
    if column not in rows.columns:
        raise ProtocolError(f"{where}.group: the manifest has no column {column!r}; use dialogue, session or one "
                            f"of {sorted(rows.columns)}")
    values = rows[column].astype(str)
    if pattern is not None:
        found = values.str.extract(pattern, expand=False)
        found = found.iloc[:, 0] if isinstance(found, pd.DataFrame) else found
        bad = found.isna()
        if bad.any():
            utt = rows.loc[bad, "utt_id"].iloc[0]
            raise ProtocolError(f"{where}: {column} {values[bad].iloc[0]!r} (utterance {utt}) does not match "
                                f"group pattern {pattern!r}")
        values = found.astype(str)
    spans = values.groupby(rows["dialogue_id"]).nunique()
    if (spans > 1).any():
        raise ProtocolError(f"{where}.group {protocol.group!r}: dialogue {spans[spans > 1].index[0]!r} spans "
                            "several groups; a group must hold whole dialogues")
    return values


def fold_splits(rows: pd.DataFrame, protocol: ProtocolParams, where: str = "protocol") -> pd.DataFrame:
    """The split (train | dev | test) of every row in every fold: one column per fold, named by the held-out
    group (`session1`, ...) or `fold1..k`, index as `rows`. Reproducible: the same rows and params give the same
    table (groups are ordered by their natural order before any draw)."""
    if protocol.kind == "official":
        return pd.DataFrame({"official": rows["split"].to_numpy()}, index=rows.index)
    groups = groups_of(rows, protocol, where)
    names = sorted(groups.unique(), key=_natural_key)
    if protocol.kind == "leave_one_group_out":
        if len(names) < 2:
            raise ProtocolError(f"{where}: leave_one_group_out needs 2 or more groups; found {names}")
        held_out = [[g] for g in names]
        label = protocol.group if protocol.group != "dialogue" else "dialogue_"
        fold_names = [fold_name(f"{label}{g}") for g in names]
    else:
        if protocol.folds > len(names):
            raise ProtocolError(f"{where}.folds: {protocol.folds} folds of {len(names)} group(s) "
                                f"({protocol.group}); at most {len(names)}")
        held_out = _balanced_folds(names, groups.value_counts(), protocol.folds, protocol.seed)
        fold_names = [f"fold{i + 1}" for i in range(protocol.folds)]
    if len(set(fold_names)) != len(fold_names):
        raise ProtocolError(f"{where}: groups {names} give clashing fold names {fold_names}")
    out = {}
    for number, (name, test) in enumerate(zip(fold_names, held_out)):
        split = np.where(groups.isin(test), "test", "train").astype(object)
        train_dialogues = sorted(rows.loc[split == "train", "dialogue_id"].unique(), key=_natural_key)
        rng = np.random.default_rng([protocol.seed, number])
        n_dev = int(round(protocol.dev_fraction * len(train_dialogues)))
        n_dev = min(max(n_dev, 1), len(train_dialogues) - 1) if len(train_dialogues) > 1 else 0
        dev = rng.permutation(np.array(train_dialogues, dtype=object))[:n_dev]
        split[rows["dialogue_id"].isin(set(dev)).to_numpy()] = "dev"
        out[name] = split
    return pd.DataFrame(out, index=rows.index)


def _balanced_folds(names: list[str], sizes: pd.Series, k: int, seed: int) -> list[list[str]]:
    """Groups in a seeded random order, each to the fold with the fewest utterances so far (ties: the lower
    fold). Written out rather than sklearn's GroupKFold so that the folds do not change with its version."""
    order = np.random.default_rng(seed).permutation(len(names))
    folds: list[list[str]] = [[] for _ in range(k)]
    load = np.zeros(k)
    for i in order:
        j = int(np.argmin(load))
        folds[j].append(names[i])
        load[j] += sizes[names[i]]
    return folds


def apply_fold(manifest: Manifest, splits: pd.DataFrame, fold: str) -> Manifest:
    """`manifest` with the splits of `fold` (a column of `fold_splits(manifest.rows, ...)`)."""
    if fold not in splits.columns:
        raise ProtocolError(f"no fold {fold!r}; folds: {list(splits.columns)}")
    rows = manifest.rows.assign(split=splits[fold].reindex(manifest.rows.index).to_numpy())
    return Manifest(rows, dataclasses.replace(manifest.meta))


class LabelMap:
    """Old class -> new class or dropped (`None`), from a protocol's `label_map` and `drop_unlisted`."""

    def __init__(self, mapping: dict[str, Optional[str]] | None = None, drop_unlisted: bool = False,
                 where: str = "label_map"):
        self.mapping, self.drop_unlisted, self.where = dict(mapping or {}), drop_unlisted, where

    @classmethod
    def of(cls, protocol: ProtocolParams, where: str = "protocol") -> "LabelMap":
        return cls(protocol.label_map, protocol.drop_unlisted, f"{where}.label_map")

    def __bool__(self) -> bool:
        return bool(self.mapping) or self.drop_unlisted

    def target(self, label: str) -> str | None:
        if label in self.mapping:
            return self.mapping[label]
        return None if self.drop_unlisted else label

    def labels(self, old: list[str]) -> list[str]:
        """The new class order: targets in the order their first source class has in `old`."""
        unknown = sorted(set(self.mapping) - set(old))
        if unknown:
            raise ProtocolError(f"{self.where}: {unknown} are not classes of the data ({old})")
        new = list(dict.fromkeys(t for t in map(self.target, old) if t is not None))
        if not new:
            raise ProtocolError(f"{self.where}: every class of {old} is dropped")
        return new

    def map(self, labels: pd.Series) -> pd.Series:
        """Each label's new class, '' where it is dropped (empty labels stay empty)."""
        return labels.map(lambda s: "" if s == "" else (self.target(s) or ""))

    def apply(self, manifest: Manifest) -> Manifest:
        """The manifest with labels mapped and the utterances of dropped classes removed (the speech
        community's IEMOCAP-4 leaves them out of training and scoring alike)."""
        if "label" not in manifest.rows.columns:
            raise ProtocolError(f"{self.where}: dataset '{manifest.meta.dataset}' has no categorical labels")
        new_labels = self.labels(manifest.meta.labels or sorted(set(manifest.rows["label"]) - {""}))
        mapped = self.map(manifest.rows["label"])
        rows = manifest.rows.assign(label=mapped)[mapped != ""]
        return Manifest(rows, dataclasses.replace(manifest.meta, labels=new_labels))

    def map_table(self, table: pd.DataFrame, labels: list[str],
                  truth: "LabelMap | None" = None) -> tuple[pd.DataFrame, list[str]]:
        """A prediction table (pipeline/metrics.py's `prediction_table`, a model's classes `labels`) in the new
        classes, ready for `score_table`: true labels mapped by `truth` (default: this map; another dataset's
        map in cross-corpus scoring, whose classes are named differently), dropped -> '' (not scored); with
        probability columns `p_<label>` they are summed into their new class and the prediction is the most
        probable kept class (a model is asked only among the classes scored); without them the predicted label
        is mapped, and a dropped one counts as wrong."""
        new = self.labels(labels)
        out = table.copy()
        if "label" in out.columns:
            out["label"] = (truth or self).map(out["label"].fillna("").astype(str))
        probs = [f"p_{c}" for c in labels]
        if all(c in out.columns for c in probs):
            merged = {t: np.zeros(len(out)) for t in new}
            for c in labels:
                t = self.target(c)
                if t is not None:
                    merged[t] = merged[t] + out[f"p_{c}"].to_numpy(np.float64)
            out = out.drop(columns=probs)
            stacked = np.stack([merged[t] for t in new], 1)
            out["prediction"] = np.array(new, dtype=object)[stacked.argmax(1)]
            for j, t in enumerate(new):
                out[f"p_{t}"] = stacked[:, j]
        else:
            out["prediction"] = self.map(out["prediction"].astype(str))
        return out, new

