"""MELD's real transcripts for the benchmarks: train + dev (test only when a user passes its CSV), as a
manifest without clips.

The one place that says where MELD's CSVs are: `$ERCFLOW_MELD`, else `data/raw/meld` in the project (where the
README has users link their MELD), a folder holding `train_sent_emo.csv` and `dev_sent_emo.csv`."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.datasets import build_manifest  # noqa: E402
from pipeline.params import DatasetParams  # noqa: E402

MELD = Path(os.environ.get("ERCFLOW_MELD") or Path(__file__).resolve().parents[1] / "data/raw/meld")


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
