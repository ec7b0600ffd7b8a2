import numpy as np
import pandas as pd
import pytest

from pipeline.manifest import Manifest, ManifestError, ManifestMeta


def rows(**over):
    base = {"utt_id": ["u0", "u1", "u2", "u3"], "dataset": "x", "split": ["train", "train", "dev", "dev"],
            "dialogue_id": ["d10", "d10", "d9", "d9"], "turn": [1, 0, 0, 1], "speaker": ["A", "B", "C", "C"],
            "text": ["hi", "yo", "a", "b"], "label": ["joy", "sad", "joy", "joy"]}
    base.update(over)
    return pd.DataFrame(base)


META = ManifestMeta(dataset="x", root="/r", labels=["joy", "sad"])


def test_order_is_split_then_dialogue_then_turn():
    m = Manifest(rows(), META)
    assert m.utt_ids == ["u1", "u0", "u2", "u3"]
    assert [list(d) for d in m.dialogues()] == [[0, 1], [2, 3]]


def test_natural_dialogue_order():
    df = rows(dialogue_id=["dia10", "dia10", "dia9", "dia9"], split="train")
    assert Manifest(df, META).rows["dialogue_id"].tolist() == ["dia9", "dia9", "dia10", "dia10"]


def test_speakers_are_bounded_per_dialogue():
    m = Manifest(rows(), META)
    # d10: B speaks first (turn 0) -> 0, A -> 1; d9: C -> 0
    assert m.speaker_index().tolist() == [0, 1, 0, 0]
    assert m.label_index().tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("over, message", [
    ({"utt_id": ["u0", "u0", "u2", "u3"]}, "duplicate utt_id: u0"),
    ({"split": ["train", "valid", "dev", "dev"]}, "split not in"),
    ({"turn": [0, 0, 0, 1]}, "share (dialogue_id, turn)"),
    ({"label": ["joy", "angry", "joy", "joy"]}, "label not in"),
    ({"split": ["train", "dev", "dev", "dev"]}, "spanning several splits"),
])
def test_validation_names_the_bad_rows(over, message):
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Manifest(rows(**over), META)


def test_missing_column_and_unknown_column():
    with pytest.raises(ManifestError, match="lacks required"):
        Manifest(rows().drop(columns=["speaker"]), META)
    with pytest.raises(ManifestError, match="unknown column"):
        Manifest(rows(extra=1), META)


def test_save_load_roundtrip(tmp_path):
    df = rows(valence=[0.1, np.nan, 0.3, 0.4], start=[0.0, 1.0, np.nan, np.nan], end=[1.0, 2.0, np.nan, np.nan],
              text=["", "\u201cquoted\u201d, yes", "1", "NA"])
    m = Manifest(df, META)
    m.save(tmp_path)
    back = Manifest.load(tmp_path)
    pd.testing.assert_frame_equal(m.rows, back.rows)
    assert back.rows["text"].tolist()[:2] == ["\u201cquoted\u201d, yes", ""]
