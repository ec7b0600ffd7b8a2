"""Generic adapter: a CSV or JSONL file with the manifest's columns, for custom data.

Required columns: utt_id, split, dialogue_id, turn, speaker, text, and `label` and/or dimensional columns
(valence, arousal, expectancy, power). Optional: video, audio (paths relative to `root`), start, end.
`dataset` defaults to the name the dataset has in params.yaml.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.datasets import Problem
from pipeline.manifest import DIMENSIONS, Manifest, ManifestError, ManifestMeta
from pipeline.params import DatasetParams


def read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"manifest file not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
    if path.suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    raise ManifestError(f"{path}: expected a .csv, .tsv or .jsonl manifest")


def missing_media(df: pd.DataFrame, root: Path) -> list[Problem]:
    """Utterances whose media file is not on disk (reported, not dropped: decode decides per params)."""
    problems = []
    for col in ("video", "audio"):
        if col not in df.columns:
            continue
        seen: dict[str, bool] = {}
        for utt, rel in zip(df["utt_id"], df[col]):
            if not rel:
                continue
            if rel not in seen:
                seen[rel] = (root / rel).exists()
            if not seen[rel]:
                problems.append(Problem(utt, str(root / rel), f"{col} file missing"))
    return problems


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
    meta = ManifestMeta(dataset=name, root=str(params.root), labels=list(labels or []),
                        dimensions=[d for d in DIMENSIONS if d in df.columns])
    manifest = Manifest(df, meta)
    return manifest, missing_media(manifest.rows, Path(params.root))
