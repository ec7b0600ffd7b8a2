"""MELD adapter: the official `{train,dev,test}_sent_emo.csv` files and the MELD.Raw clip layout.

Clips: `train_splits/dia{D}_utt{U}.mp4`, `dev_splits_complete/dia{D}_utt{U}.mp4`,
`output_repeated_splits_test/dia{D}_utt{U}.mp4` under `root`. Clips that are missing are reported, once per
utterance (they stay in the manifest; the decode stage masks them or stops, per `decode.on_bad_media`).

With `csv_dir` and no `root` the dataset is the transcripts alone: the manifest has no media columns, so its
media are absent rather than missing and nothing is reported. With a `root` the clips are expected there, and
a root without its clip folders reports every clip missing.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pandas as pd

from pipeline.datasets.base import ADAPTERS
from pipeline.datasets.generic import missing_media
from pipeline.manifest import Manifest, ManifestError, ManifestMeta
from pipeline.params import DatasetParams

LABELS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
SPLIT_FILES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
CLIP_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
_TIMESTAMP = re.compile(r"^(\d{1,2}):(\d{2}):(\d{2})[,.](\d{1,3})$")


def parse_timestamp(value: str) -> float:
    """'00:16:16,059' or '0:12:43,012' -> seconds."""
    m = _TIMESTAMP.match(value.strip())
    if not m:
        raise ValueError(f"not a MELD timestamp: {value!r}")
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def read_split(path: Path, split: str, media: bool = True) -> pd.DataFrame:
    """One official CSV as manifest rows; `media`: with the clip path as `video` and `audio`."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    need = ["Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID", "StartTime", "EndTime"]
    lacking = [c for c in need if c not in raw.columns]
    if lacking:
        raise ManifestError(f"{path}: not a MELD CSV, lacks column(s) {lacking}")
    rows = []
    for i, r in raw.iterrows():
        d, u = r["Dialogue_ID"].strip(), r["Utterance_ID"].strip()
        where = f"{path.name} row {i + 2} (dia{d}_utt{u})"
        try:  # the clip is already cut; the timestamps are only checked
            parse_timestamp(r["StartTime"]), parse_timestamp(r["EndTime"])
        except ValueError as e:
            raise ManifestError(f"{where}: {e}") from None
        rel = f"{CLIP_DIRS[split]}/dia{d}_utt{u}.mp4"
        rows.append({
            "utt_id": f"meld_{split}_dia{d}_utt{u}", "dataset": "meld", "split": split,
            "dialogue_id": f"{split}_dia{d}", "turn": int(u), "speaker": r["Speaker"].strip(),
            "text": unicodedata.normalize("NFC", r["Utterance"]).strip(), "label": r["Emotion"].strip().lower(),
            **({"video": rel, "audio": rel} if media else {}),
        })
    return pd.DataFrame(rows)


@ADAPTERS.register("meld")
def build(name: str, params: DatasetParams):
    root = params.root
    if not (params.csv_dir or root):
        raise ManifestError(f"data.{name}: the MELD adapter needs 'root' (MELD.Raw: the CSVs and clip folders) "
                            "or 'csv_dir' alone (the CSVs: a text-only dataset)")
    csv_dir = Path(params.csv_dir or root)
    frames = [read_split(csv_dir / f, s, media=bool(root)) for s, f in SPLIT_FILES.items() if (csv_dir / f).exists()]
    if not frames:
        raise ManifestError(f"data.{name}: no MELD CSV ({', '.join(SPLIT_FILES.values())}) in {csv_dir}")
    df = pd.concat(frames, ignore_index=True)
    df["dataset"] = name
    meta = ManifestMeta(dataset=name, root=str(root) if root else None, labels=params.labels or LABELS,
                        allow_outside_root=params.allow_outside_root)
    manifest = Manifest(df, meta)
    return manifest, missing_media(manifest.rows, meta.root)
