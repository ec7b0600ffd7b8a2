import json

import numpy as np
import pytest

from conftest import MELD_CSVS
from pipeline.datasets import build_manifest
from pipeline.datasets.meld import parse_timestamp
from pipeline.manifest import ManifestError
from pipeline.params import DatasetParams

MELD_HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"


def write_meld(root, with_test=True):
    (root / "train_sent_emo.csv").write_text(MELD_HEADER + (
        '1,"also I was the point person on my company\u2019s transition",Chandler,neutral,neutral,0,0,8,21,'
        '"00:16:16,059","00:16:21,731"\n'
        "2,You must\u2019ve had your hands full.,The Interviewer,neutral,neutral,0,1,8,21,\"00:16:21,940\",\"00:16:23,442\"\n"
        '3,"Oh my God, yes!",All,joy,positive,1,0,8,21,"0:12:43,012","0:12:44,074"\n'), encoding="utf-8")
    (root / "dev_sent_emo.csv").write_text(MELD_HEADER + (
        '1,Why?,Ross,surprise,positive,0,0,1,2,"0:05:52,435","0:05:53,897"\n'), encoding="utf-8")
    if with_test:
        (root / "test_sent_emo.csv").write_text(MELD_HEADER + (
            '1,Stop.,Monica,anger,negative,3,0,1,2,"0:01:00,894","0:01:02,271"\n'), encoding="utf-8")
    for rel in ("train_splits/dia0_utt0.mp4", "train_splits/dia0_utt1.mp4", "train_splits/dia1_utt0.mp4",
                "dev_splits_complete/dia0_utt0.mp4"):  # the test clip is left missing
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def test_meld_timestamps():
    assert parse_timestamp("00:16:16,059") == pytest.approx(976.059)
    assert parse_timestamp("0:12:43,012") == pytest.approx(763.012)
    with pytest.raises(ValueError):
        parse_timestamp("12:43")


def test_meld_fixture(tmp_path):
    write_meld(tmp_path)
    m, problems = build_manifest("meld", DatasetParams(adapter="meld", root=str(tmp_path)))
    assert len(m) == 5
    r = m.rows.set_index("utt_id")
    assert r.at["meld_train_dia0_utt0", "text"] == "also I was the point person on my company\u2019s transition"
    assert r.at["meld_train_dia1_utt0", "speaker"] == "All"
    assert r.at["meld_dev_dia0_utt0", "video"] == "dev_splits_complete/dia0_utt0.mp4"
    assert r.at["meld_test_dia3_utt0", "video"] == "output_repeated_splits_test/dia3_utt0.mp4"
    assert m.meta.labels == ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
    # dev dia0 and train dia0 are different dialogues
    assert len(m.dialogues()) == 4
    # one mp4 holds video and audio: reported once
    assert [(p.utt_id, p.problem) for p in problems] == [("meld_test_dia3_utt0", "video and audio file missing")]


def test_meld_csvs_alone_are_text_only(tmp_path):
    """csv_dir without root: media absent (no media columns, nothing reported); with a root whose clip folders
    are missing, every clip is still reported missing."""
    write_meld(tmp_path)
    m, problems = build_manifest("meld", DatasetParams(adapter="meld", root=None, csv_dir=str(tmp_path)))
    assert len(m) == 5 and problems == [] and m.meta.root is None
    assert "video" not in m.rows.columns and "audio" not in m.rows.columns
    empty = tmp_path / "no_clips"
    empty.mkdir()
    m, problems = build_manifest("meld", DatasetParams(adapter="meld", root=str(empty), csv_dir=str(tmp_path)))
    assert len(problems) == len(m) == 5
    assert all(p.problem == "video and audio file missing" for p in problems)
    with pytest.raises(ManifestError, match="needs 'root'.*or 'csv_dir'"):
        build_manifest("meld", DatasetParams(adapter="meld", root=None))


def test_meld_bad_timestamp_names_the_row(tmp_path):
    write_meld(tmp_path, with_test=False)
    (tmp_path / "dev_sent_emo.csv").write_text(MELD_HEADER + '1,Why?,Ross,surprise,positive,0,0,1,2,"soon","0:05:53,897"\n')
    with pytest.raises(ManifestError, match=r"dev_sent_emo.csv row 2 \(dia0_utt0\)"):
        build_manifest("meld", DatasetParams(adapter="meld", root=str(tmp_path)))


@pytest.mark.skipif(not (MELD_CSVS / "train_sent_emo.csv").exists(), reason="MELD CSVs absent (set ERCFLOW_MELD)")
def test_meld_real_csvs(tmp_path):
    m, problems = build_manifest("meld", DatasetParams(adapter="meld", root=str(tmp_path),
                                                       csv_dir=str(MELD_CSVS)))
    counts = m.rows["split"].value_counts().to_dict()
    assert counts == {"train": 9989, "dev": 1109}
    assert m.rows.groupby("split")["dialogue_id"].nunique().to_dict() == {"train": 1038, "dev": 114}
    assert len(problems) == len(m)  # no clips under tmp_path: every one reported (once), none dropped
    assert m.speaker_index().max() < 10


def write_iemocap(root):
    """Sessions 1-5 with two dialogues each, in the IEMOCAP_full_release layout."""
    emos = ["neu", "hap", "sad", "ang", "exc", "fru", "xxx", "sur"]
    for s in range(1, 6):
        sess = root / f"Session{s}"
        for k, dialog in enumerate([f"Ses0{s}F_impro0{1}", f"Ses0{s}M_script0{1}_2"]):
            ev, tr = [], []
            for u in range(8):
                utt = f"{dialog}_{'FM'[u % 2]}{u:03d}"
                start, end = 1.0 + 2 * u, 2.5 + 2 * u
                ev.append(f"[{start:.4f} - {end:.4f}]\t{utt}\t{emos[(u + k + s) % 8]}\t[{2.5 + u % 3:.4f}, 3.0000, 2.0000]")
                ev.append("C-E1:\tNeutral;\t()")
                tr.append(f"{utt} [{start:08.4f}-{end:08.4f}]: words of {utt}")
                wav = sess / "sentences/wav" / dialog / f"{utt}.wav"
                wav.parent.mkdir(parents=True, exist_ok=True)
                wav.write_bytes(b"")
            (sess / "dialog/EmoEvaluation").mkdir(parents=True, exist_ok=True)
            (sess / "dialog/EmoEvaluation" / f"{dialog}.txt").write_text("% header\n\n" + "\n".join(ev) + "\n")
            (sess / "dialog/transcriptions").mkdir(parents=True, exist_ok=True)
            (sess / "dialog/transcriptions" / f"{dialog}.txt").write_text("\n".join(reversed(tr)) + "\n")
            (sess / "dialog/avi/DivX").mkdir(parents=True, exist_ok=True)
            (sess / "dialog/avi/DivX" / f"{dialog}.avi").write_bytes(b"")


def test_iemocap_fixture(tmp_path):
    write_iemocap(tmp_path)
    p = DatasetParams(adapter="iemocap", root=str(tmp_path), dev_fraction=0.25, seed=3)
    m, problems = build_manifest("iemocap", p)
    assert problems == []
    assert set(m.rows["label"]) <= {"happy", "sad", "neutral", "angry", "excited", "frustrated"}
    assert {"happy", "excited"} <= set(m.rows["label"])         # not merged
    assert len(m) == 5 * 2 * 6                                     # xxx and sur are left out
    split_of = m.rows.groupby("dialogue_id")["split"].first()
    assert all(split_of[d] == "test" for d in split_of.index if d.startswith("Ses05"))
    assert (split_of == "dev").sum() == 2                          # 25% of the 8 train dialogues
    m2, _ = build_manifest("iemocap", p)
    assert m2.rows["split"].tolist() == m.rows["split"].tolist()   # seeded
    r = m.rows.set_index("utt_id").loc["Ses01F_impro01_F000"]
    assert (r["start"], r["end"], r["valence"], r["power"]) == (1.0, 2.5, 2.5, 2.0)
    assert r["text"] == "words of Ses01F_impro01_F000" and r["speaker"] == "Ses01F"
    assert r["audio"] == "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"
    assert r["video"] == "Session1/dialog/avi/DivX/Ses01F_impro01.avi"
    assert m.meta.dimensions == ["valence", "arousal", "power"]
    # turns follow start times
    d = m.rows[m.rows["dialogue_id"] == "Ses01F_impro01"]
    assert np.all(np.diff(d["start"].to_numpy()) > 0)


def test_generic_csv_and_jsonl(tmp_path):
    recs = [{"utt_id": f"u{i}", "split": "train" if i < 4 else "test", "dialogue_id": f"d{i // 2}",
             "turn": i % 2, "speaker": "AB"[i % 2], "text": f"t{i}", "valence": 0.1 * i, "arousal": -0.1 * i}
            for i in range(6)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    import pandas as pd

    pd.DataFrame(recs).to_csv(tmp_path / "m.csv", index=False)
    for f in ("m.jsonl", "m.csv"):
        m, _ = build_manifest("avec", DatasetParams(adapter="generic", root=str(tmp_path), manifest=str(tmp_path / f)))
        assert len(m) == 6 and m.meta.dimensions == ["valence", "arousal"] and m.meta.labels == []
        assert m.rows["valence"].tolist() == pytest.approx([0.1 * i for i in range(6)])


def test_sample_adapter(sample_manifest):
    m = sample_manifest
    assert m.meta.labels == ["neutral", "joy", "sadness", "anger"]
    assert set(m.rows["split"]) == {"train", "dev", "test"}
    assert all(m.rows["video"].str.endswith(".mp4"))
