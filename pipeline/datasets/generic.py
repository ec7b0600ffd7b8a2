"""Generic adapter: a CSV or JSONL file with the manifest's columns, for custom data.

Required columns: utt_id, split, dialogue_id, turn, speaker, text, and `label` and/or dimensional columns
(valence, arousal, expectancy, power). Optional: video, audio (paths relative to `root`), start, end.
`dataset` defaults to the name the dataset has in params.yaml.

Without media columns (or with them empty) the dataset is text-only and needs no `root`; an utterance with an
empty media value has none (absent, not missing). A media path that is given must exist under `root` and stay
inside it (pipeline/manifest.py).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.datasets.base import ADAPTERS
from pipeline.manifest import DIMENSIONS, Manifest, ManifestError, ManifestMeta
from pipeline.params import DatasetParams
from pipeline.problems import Problem


def read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise ManifestError(f"manifest file not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
    if path.suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    raise ManifestError(f"{path}: expected a .csv, .tsv or .jsonl manifest")


def missing_media(df: pd.DataFrame, root: str | Path | None) -> list[Problem]:
    """Utterances whose media file is not on disk (reported, not dropped: decode decides per params), one
    problem per utterance and file: MELD's video and audio are one mp4, reported once. An empty path is an
    utterance without that medium, not a problem."""
    cols = [c for c in ("video", "audio") if c in df.columns]
    if root is None or not cols:
        return []
    root = Path(root)
    exists: dict[str, bool] = {}
    problems = []
    for utt, *paths in df[["utt_id", *cols]].itertuples(index=False):
        by_file: dict[str, list[str]] = {}
        for col, rel in zip(cols, paths):
            if rel:
                by_file.setdefault(rel, []).append(col)
        for rel, which in by_file.items():
            if rel not in exists:
                exists[rel] = (root / rel).exists()
            if not exists[rel]:
                problems.append(Problem(utt, str(root / rel), f"{' and '.join(which)} file missing"))
    return problems


@ADAPTERS.register("generic")
def build(name: str, params: DatasetParams, drop_columns: tuple[str, ...] = ()):
    if not params.manifest:
        raise ManifestError(f"data.{name}: the generic adapter needs 'manifest' (a CSV or JSONL path)")
    df = read_table(Path(params.manifest)).drop(columns=list(drop_columns), errors="ignore")
    if "dataset" not in df.columns:
        df["dataset"] = name
    for col in ("utt_id", "dialogue_id", "speaker", "text"):
        if col in df.columns:
            df[col] = df[col].astype(str)
    labels = params.labels
    if labels is None and "label" in df.columns:
        labels = sorted(x for x in df["label"].astype(str).unique() if x)
    root = params.root
    meta = ManifestMeta(dataset=name, root=str(root) if root else None, labels=list(labels or []),
                        dimensions=[d for d in DIMENSIONS if d in df.columns],
                        allow_outside_root=params.allow_outside_root)
    manifest = Manifest(df, meta)   # refuses media paths outside the root, or media paths with no root
    return manifest, missing_media(manifest.rows, meta.root)
