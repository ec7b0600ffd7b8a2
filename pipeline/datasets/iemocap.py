"""IEMOCAP adapter: the `IEMOCAP_full_release/Session{1..5}` layout.

- labels and dimensional scores: `SessionN/dialog/EmoEvaluation/<dialog>.txt`
  (`[start - end]<TAB>utt<TAB>emo<TAB>[V, A, D]`); V, A, D go to valence, arousal, power;
- text: `SessionN/dialog/transcriptions/<dialog>.txt` (`utt [start-end]: text`);
- audio: `SessionN/sentences/wav/<dialog>/<utt>.wav` (one file per utterance);
- video: `SessionN/dialog/avi/DivX/<dialog>.avi` (one file per dialogue, cut by start/end).

The six classes of the papers are kept apart (happy and excited are not merged); utterances with other
labels (surprise, fear, disgust, other, xxx) are left out. Sessions 1-4 are train, with `dev_fraction`
of their dialogues (seeded) held out as dev; session 5 is test.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.datasets.base import ADAPTERS
from pipeline.datasets.generic import missing_media
from pipeline.manifest import Manifest, ManifestError, ManifestMeta
from pipeline.params import DatasetParams

CODES = {"hap": "happy", "sad": "sad", "neu": "neutral", "ang": "angry", "exc": "excited", "fru": "frustrated"}
LABELS = list(CODES.values())
_EVAL = re.compile(r"^\[(\d+\.\d+) - (\d+\.\d+)\]\t(\S+)\t(\w+)\t\[([\d.]+), ([\d.]+), ([\d.]+)\]")
_TRANS = re.compile(r"^(\S+) \[[\d.]+-[\d.]+\]:\s*(.*)$")


def read_evaluation(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _EVAL.match(line)
        if m:
            start, end, utt, emo, v, a, d = m.groups()
            rows.append({"utt": utt, "start": float(start), "end": float(end), "emo": emo,
                         "valence": float(v), "arousal": float(a), "power": float(d)})
    return rows


def read_transcription(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _TRANS.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


@ADAPTERS.register("iemocap")
def build(name: str, params: DatasetParams):
    if not params.root:
        raise ManifestError(f"data.{name}: the IEMOCAP adapter needs 'root' (the IEMOCAP_full_release folder)")
    root = Path(params.root)
    sessions = sorted(root.glob("Session[1-5]"))
    if not sessions:
        raise ManifestError(f"data.{name}: no Session1..5 folders under {root}")
    rows = []
    for sess in sessions:
        n = int(sess.name[-1])
        for eval_file in sorted((sess / "dialog" / "EmoEvaluation").glob("*.txt")):
            dialog = eval_file.stem
            trans_file = sess / "dialog" / "transcriptions" / f"{dialog}.txt"
            if not trans_file.exists():
                raise ManifestError(f"{trans_file}: transcription missing for dialogue {dialog}")
            texts = read_transcription(trans_file)
            evals = sorted(read_evaluation(eval_file), key=lambda r: r["start"])
            for turn, e in enumerate(evals):
                if e["emo"] not in CODES:
                    continue
                if e["utt"] not in texts:
                    raise ManifestError(f"{trans_file}: no transcription for utterance {e['utt']}")
                gender = e["utt"].rsplit("_", 1)[1][0]
                rows.append({
                    "utt_id": e["utt"], "dataset": name, "split": "test" if n == 5 else "train",
                    "dialogue_id": dialog, "turn": turn, "speaker": f"Ses{n:02d}{gender}",
                    "text": texts[e["utt"]], "label": CODES[e["emo"]],
                    "valence": e["valence"], "arousal": e["arousal"], "power": e["power"],
                    "audio": f"{sess.name}/sentences/wav/{dialog}/{e['utt']}.wav",
                    "video": f"{sess.name}/dialog/avi/DivX/{dialog}.avi",
                    "start": e["start"], "end": e["end"],
                })
    if not rows:
        raise ManifestError(f"data.{name}: no labelled utterance found under {root}")
    df = pd.DataFrame(rows)
    train_dialogues = sorted(df.loc[df["split"] == "train", "dialogue_id"].unique())
    rng = np.random.default_rng(params.seed)
    n_dev = int(round(params.dev_fraction * len(train_dialogues)))
    dev = set(rng.permutation(train_dialogues)[:n_dev].tolist())
    df.loc[df["dialogue_id"].isin(dev), "split"] = "dev"
    meta = ManifestMeta(dataset=name, root=str(root), labels=params.labels or LABELS,
                        dimensions=["valence", "arousal", "power"],
                        allow_outside_root=params.allow_outside_root)
    manifest = Manifest(df, meta)
    return manifest, missing_media(manifest.rows, root)
