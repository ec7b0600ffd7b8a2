"""The evaluation sections of params.yaml: a dataset's protocol (`data.<name>.protocol`), the report's headline
metrics (`headline`), its confidence intervals and paired tests (`significance`), cross-corpus runs
(`cross_corpus`) and the papers' claims (`claims`, carried by the recipes), with the checks between them and
the data sections (a label map must name classes the data has).

The protocol's *data* lives here, in the params package, so that every stage reading params does not depend on
the fold code: pipeline/protocols.py (which reads manifests) re-exports `ProtocolParams` and `PRESETS`.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag
from pydantic.dataclasses import dataclass

from pipeline.vocab import FORBID, Name, PositiveInt, Seed

# groups known by name: (manifest column, pattern whose first capture group names the group)
NAMED_GROUPS = {
    "dialogue": ("dialogue_id", None),
    "session": ("dialogue_id", r"^Ses0*(\d+)"),   # IEMOCAP: Ses01F_impro01 -> session 1
}

# IEMOCAP's four classes of the speech community: happy and excited merged, the rest dropped
IEMOCAP4 = {"neutral": "neutral", "happy": "happy", "excited": "happy", "sad": "sad", "angry": "angry"}

# each adapter's classes when `data.<name>.labels` is not given (pipeline/datasets/*.py `LABELS`; the params
# package cannot import the adapters, which import it: tests/test_protocol_params.py holds the two equal). The
# generic adapter reads its classes from the data: its label maps are checked when the train stage applies them.
ADAPTER_LABELS = {
    "sample": ["neutral", "joy", "sadness", "anger"],
    "meld": ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"],
    "iemocap": ["happy", "sad", "neutral", "angry", "excited", "frustrated"],
}

CATEGORICAL_METRICS = ("wf1", "macro_f1", "accuracy", "ua")     # pipeline/metrics.py CATEGORICAL
DIMENSIONAL_METRICS = ("mean_ccc", "mean_r", "mean_mse")        # pipeline/metrics.py DIMENSIONAL
MetricKey = Literal["wf1", "macro_f1", "accuracy", "ua", "mean_ccc", "mean_r", "mean_mse"]


@dataclass(config=FORBID)
class ProtocolParams:
    """One evaluation protocol (pipeline/protocols.py), e.g. `data.<name>.protocol`."""
    kind: Literal["official", "leave_one_group_out", "kfold"] = "official"
    # what a fold holds out: `dialogue`, `session` (IEMOCAP, from the dialogue id) or a manifest column whose
    # value is the same for every utterance of a dialogue
    group: str = "dialogue"
    group_pattern: Optional[str] = None   # a regex on the group's values; its first capture group names the group
    folds: Optional[PositiveInt] = None   # kfold: how many folds (>= 2)
    dev_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1   # share of each fold's training dialogues held out
    seed: Seed = 0
    # old label -> new label, or null to drop it; labels not listed are kept unless `drop_unlisted`
    label_map: dict[str, Optional[str]] = dataclasses.field(default_factory=dict)
    drop_unlisted: bool = False

    def __post_init__(self):
        if self.kind == "kfold" and (self.folds is None or self.folds < 2):
            raise ValueError("kind kfold needs folds >= 2")
        if self.kind != "kfold" and self.folds is not None:
            raise ValueError(f"folds is set by kind kfold only (kind is {self.kind})")
        pattern = self.group_pattern or NAMED_GROUPS.get(self.group, (None, None))[1]
        if pattern is not None:
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"group_pattern {pattern!r} is not a regex ({e})") from None
            if compiled.groups < 1:
                raise ValueError(f"group_pattern {pattern!r} needs a capture group naming the group")


PRESETS = {
    "official": ProtocolParams(),
    "iemocap4_loso": ProtocolParams(kind="leave_one_group_out", group="session", label_map=IEMOCAP4,
                                    drop_unlisted=True),
    "iemocap6_loso": ProtocolParams(kind="leave_one_group_out", group="session"),
}
PresetName = Literal["official", "iemocap4_loso", "iemocap6_loso"]


def _protocol_form(value) -> str:
    """A preset's name or a mapping (pydantic's discriminator: each form's errors alone, not both)."""
    return "preset" if isinstance(value, str) else "mapping"


Protocol = Annotated[Union[Annotated[PresetName, Tag("preset")], Annotated[ProtocolParams, Tag("mapping")]],
                     Discriminator(_protocol_form)]


def resolve_protocol(p: Protocol) -> ProtocolParams:
    """A preset name's protocol, or the protocol itself."""
    return PRESETS[p] if isinstance(p, str) else p


@dataclass(config=FORBID)
class SignificanceParams:
    """The report's confidence intervals (bootstrap over dialogues) and paired tests (pipeline/significance.py)."""
    n_resamples: PositiveInt = 2000      # bootstrap / randomisation draws
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    seed: Seed = 0                       # every draw: the same predictions give the same report
    method: Literal["percentile", "BCa"] = "percentile"


@dataclass(config=FORBID)
class CrossParams:
    """One cross-corpus run (`cross_corpus.<name>`, stage cross): the bundle models/<train>/<head> scored on
    the `split` of dataset `test`, both sides' classes mapped to shared ones."""
    train: Name                          # the dataset the bundle was trained on
    head: Name
    test: Name                           # the dataset whose split is scored
    split: Literal["test", "dev", "train", "all"] = "test"   # of the test dataset's own (official) splits
    model_map: dict[str, Optional[str]] = dataclasses.field(default_factory=dict)   # model class -> shared / null
    data_map: dict[str, Optional[str]] = dataclasses.field(default_factory=dict)    # data class -> shared / null
    drop_unlisted: bool = False          # classes a map does not list are dropped (else kept under their name)


@dataclass(config=FORBID)
class ClaimParams:
    """What a paper reports (`claims`, carried by a recipe), printed beside ours."""
    head: Name
    dataset: Name
    metric: MetricKey
    value: float                         # as printed (a value > 1 is a percentage)
    source: str                          # "arXiv:2401.12987 Table 2"
    protocol: str = "official"


def _labels_of(name: str, d: Mapping) -> list[str] | None:
    labels = d.get("labels")
    if isinstance(labels, list) and all(isinstance(x, str) for x in labels):
        return labels
    return ADAPTER_LABELS.get(d.get("adapter"))


def _mapped(labels: list[str], mapping: Mapping, drop_unlisted: bool) -> list[str]:
    out = [mapping.get(c, c) if c in mapping else (None if drop_unlisted else c) for c in labels]
    return list(dict.fromkeys(c for c in out if isinstance(c, str)))


def _map_problems(where: str, mapping: Any, labels: list[str] | None, drop_unlisted: bool) -> list[str]:
    if not isinstance(mapping, Mapping) or labels is None:
        return []
    unknown = [k for k in mapping if k not in labels]
    if unknown:
        return [f"{where}: {unknown} are not classes of the data ({labels})"]
    if not _mapped(labels, mapping, drop_unlisted):
        return [f"{where}: every class of {labels} is dropped"]
    return []


def trained_labels(data: Mapping, dataset: str) -> list[str] | None:
    """The classes a head trained on `dataset` predicts: the data's, through its protocol's label map."""
    d = data.get(dataset)
    if not isinstance(d, Mapping):
        return None
    labels = _labels_of(dataset, d)
    p = d.get("protocol", "official")
    if labels is None or not (isinstance(p, str) and p in PRESETS or isinstance(p, Mapping)):
        return labels
    p = dataclasses.asdict(PRESETS[p]) if isinstance(p, str) else p
    mapping = p.get("label_map") or {}
    if not isinstance(mapping, Mapping) or any(k not in labels for k in mapping):
        return None
    return _mapped(labels, mapping, bool(p.get("drop_unlisted", False)))


def evaluation_problems(raw: Mapping[str, Any]) -> list[str]:
    """Problems between the evaluation sections and the rest (read defensively: the schema reports malformed
    sections itself). Each one line, its params path first."""
    def section(v) -> dict:
        return v if isinstance(v, dict) else {}

    data, heads = section(raw.get("data")), section(raw.get("heads"))
    problems = []
    if "cross" in data:
        problems.append("data.cross: the name 'cross' is taken by results/cross/ (cross-corpus results)")
    for name, d in data.items():
        d = section(d)
        p = d.get("protocol")
        if isinstance(p, Mapping):
            problems += _map_problems(f"data.{name}.protocol.label_map", p.get("label_map"), _labels_of(name, d),
                                      bool(p.get("drop_unlisted", False)))
        elif p in PRESETS and PRESETS[p].label_map:
            problems += [q.replace(f"data.{name}.protocol.label_map", f"data.{name}.protocol ({p})")
                         for q in _map_problems(f"data.{name}.protocol.label_map", PRESETS[p].label_map,
                                                _labels_of(name, d), PRESETS[p].drop_unlisted)]
    for name, c in section(raw.get("cross_corpus")).items():
        c = section(c)
        where = f"cross_corpus.{name}"
        for key in ("train", "test"):
            if isinstance(c.get(key), str) and c[key] not in data:
                problems.append(f"{where}.{key}: {c[key]!r} has no entry in data (defined: {sorted(data)})")
        if isinstance(c.get("head"), str) and c["head"] not in heads:
            problems.append(f"{where}.head: {c['head']!r} has no entry in heads (defined: {sorted(heads)})")
        # stage cross reads what the pipeline writes: the bundle (train@<train>-<head>), the manifest (prepare@<test>)
        listed = {k: raw.get(k) if isinstance(raw.get(k), list) else [] for k in ("datasets", "train")}
        for key, section_key in (("train", "datasets"), ("test", "datasets"), ("head", "train")):
            v = c.get(key)
            if isinstance(v, str) and v in (heads if key == "head" else data) and v not in listed[section_key]:
                problems.append(f"{where}.{key}: {v!r} is not in `{section_key}` ({listed[section_key]}): the pipeline "
                                f"does not {'train it' if key == 'head' else 'prepare it'}")
        drop = bool(c.get("drop_unlisted", False))
        if isinstance(c.get("train"), str):
            problems += _map_problems(f"{where}.model_map", c.get("model_map"), trained_labels(data, c["train"]), drop)
        if isinstance(c.get("test"), str) and isinstance(data.get(c["test"]), Mapping):
            problems += _map_problems(f"{where}.data_map", c.get("data_map"), _labels_of(c["test"], data[c["test"]]),
                                      drop)
    for name, keys in section(raw.get("headline")).items():
        if name not in data:
            problems.append(f"headline.{name}: {name!r} has no entry in data (defined: {sorted(data)})")
        elif isinstance(keys, list) and keys and not (set(keys) <= set(CATEGORICAL_METRICS)
                                                      or set(keys) <= set(DIMENSIONAL_METRICS)):
            problems.append(f"headline.{name}: {keys} mixes categorical {list(CATEGORICAL_METRICS)} and dimensional "
                            f"{list(DIMENSIONAL_METRICS)} metrics")
    return problems
