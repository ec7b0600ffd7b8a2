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


# -- media paths stay inside their root ------------------------------------------------------------------

def media_rows(tmp_path, video):
    root = tmp_path / "root"
    (root / "clips").mkdir(parents=True, exist_ok=True)
    (root / "clips" / "ok.mp4").write_bytes(b"")
    return root, rows(video=["clips/ok.mp4", video, "clips/ok.mp4", ""], audio="")


@pytest.mark.parametrize("video", ["../x.mp4", "/etc/passwd", "clips/../../x.mp4", "link/out.mp4", "clips/evil.mp4"])
def test_media_path_outside_the_root_is_refused(tmp_path, video):
    from pipeline.manifest import OutsideRootError, resolve_media_path

    root, df = media_rows(tmp_path, video)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)         # a folder symlink pointing out
    (root / "clips" / "evil.mp4").symlink_to(tmp_path / "secret.mp4")     # a file symlink pointing out
    meta = ManifestMeta(dataset="x", root=str(root), labels=["joy", "sad"])
    with pytest.raises(ManifestError, match=rf"row 2 \(utt_id u1\): video path '{video}' resolves to .*outside the "
                                            r"dataset root .*allow_outside_root"):
        Manifest(df, meta)
    with pytest.raises(OutsideRootError):
        resolve_media_path(root, video)
    # opted in: the same rows are read, and the path resolves where it points
    m = Manifest(df, ManifestMeta(dataset="x", root=str(root), labels=["joy", "sad"], allow_outside_root=True))
    rel = m.rows.set_index("utt_id").at["u1", "video"]
    assert not m.media_path(rel).is_relative_to(root.resolve())


def test_paths_inside_the_root_pass_and_a_loaded_manifest_is_checked_again(tmp_path):
    root, df = media_rows(tmp_path, "clips/sub/../ok.mp4")
    (root / "inner").symlink_to(root / "clips", target_is_directory=True)  # a symlink that stays inside
    df.loc[3, "video"] = "inner/ok.mp4"
    m = Manifest(df, ManifestMeta(dataset="x", root=str(root), labels=["joy", "sad"]))
    assert m.media_path("inner/ok.mp4") == (root / "clips" / "ok.mp4").resolve()
    m.save(tmp_path / "m")
    assert Manifest.load(tmp_path / "m").utt_ids == m.utt_ids
    # a manifest edited (or received) with a path that leaves the root is refused when it is loaded
    csv = tmp_path / "m" / "manifest.csv"
    csv.write_text(csv.read_text().replace("inner/ok.mp4", "../../etc/hosts"))
    with pytest.raises(ManifestError, match=r"row \d \(utt_id u\d\): video path '../../etc/hosts'"):
        Manifest.load(tmp_path / "m")


def test_generic_adapter_refuses_and_opts_in(tmp_path):
    from pipeline.datasets import build_manifest
    from pipeline.params import DatasetParams

    root, df = media_rows(tmp_path, "../outside.mp4")
    df.drop(columns=["dataset"]).to_csv(tmp_path / "m.csv", index=False)
    p = dict(adapter="generic", root=str(root), manifest=str(tmp_path / "m.csv"))
    with pytest.raises(ManifestError, match=r"manifest of 'mine': row 2 \(utt_id u1\): video path '../outside.mp4'"):
        build_manifest("mine", DatasetParams(**p))
    m, problems = build_manifest("mine", DatasetParams(**p, allow_outside_root=True))
    assert m.meta.allow_outside_root and [q.utt_id for q in problems] == ["u1"]   # read, and reported missing
