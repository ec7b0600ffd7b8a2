"""MELD's real transcripts for the benchmarks: train + dev from ../shared/data/meld (test only when a user
passes its CSV), as a manifest without clips."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.datasets import build_manifest  # noqa: E402
from pipeline.params import DatasetParams  # noqa: E402

MELD = Path(__file__).resolve().parents[2] / "shared/data/meld"


def meld_manifest(tmp: str | Path, csv_dir: str | Path = MELD, test_csv: str | None = None):
    """Copy the chosen CSVs into `tmp` (so no stray test CSV is picked up) and build the MELD manifest."""
    folder = Path(tmp) / "csv"
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("train_sent_emo.csv", "dev_sent_emo.csv"):
        shutil.copy(Path(csv_dir) / f, folder / f)
    if test_csv:
        shutil.copy(test_csv, folder / "test_sent_emo.csv")
    manifest, _ = build_manifest("meld", DatasetParams(adapter="meld", root=str(tmp), csv_dir=str(folder)))
    return manifest
