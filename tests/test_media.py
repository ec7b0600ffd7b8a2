
import numpy as np
import pytest

from pipeline.media import MediaError, decode_dataset, frame_indices
from pipeline.params import DecodeParams
from pipeline.store import MediaStore
from conftest import bad_media_manifest


def test_sample_media_store(sample_manifest, sample_media):
    with MediaStore(sample_media) as s:
        assert s.utt_ids == sample_manifest.utt_ids
        assert s.attrs["sample_rate"] == 16000 and s.attrs["frames"] == 4
        assert s.file["frames"].shape == (len(sample_manifest), 4, 32, 32, 3)
        assert s.file["frames"].dtype == np.uint8
        assert s.fixed("audio_valid").all() and s.fixed("video_valid").all()
        a = s.audio(s.utt_ids[0])
        assert a.dtype == np.float32 and 0.8 * 16000 < len(a) < 2.8 * 16000


def test_frame_indices_uniform_and_repeating():
    assert frame_indices(0, 9, 4).tolist() == [0, 3, 6, 9]
    assert frame_indices(5, 6, 4).tolist() == [5, 5, 6, 6]


def test_bad_media_is_masked_and_reported(tmp_path):
    m = bad_media_manifest(tmp_path)
    p = DecodeParams(frames=4, size=16, max_clip_seconds=4.0, long_clip="trim", chunk_size=3)
    summary = decode_dataset(m, tmp_path / "media.h5", p)
    by = {(q["utt_id"], q["modality"]): q for q in summary["problems"]}
    assert by[("corrupt", "visual")]["problem"].startswith("unreadable video")
    assert by[("corrupt", "visual")]["file"].endswith("corrupt.mp4")
    assert by[("missing", "audio")]["problem"] == "audio file missing"
    assert by[("notrack", "audio")]["problem"] == "no audio track"
    assert ("notrack", "visual") not in by
    assert by[("long", "audio")]["action"] == "trimmed" and by[("long", "visual")]["action"] == "trimmed"
    with MediaStore(tmp_path / "media.h5") as s:
        av = dict(zip(s.utt_ids, s.fixed("audio_valid")))
        vv = dict(zip(s.utt_ids, s.fixed("video_valid")))
        assert av == {"good": True, "corrupt": False, "missing": False, "notrack": False, "long": True,
                      "part1": True, "part2": True}
        assert vv["notrack"] and not vv["corrupt"] and not vv["missing"]
        assert s.problems() == summary["problems"]                    # the store carries its own report
        assert len(s.audio("long")) == 4 * 16000                      # trimmed to max_clip_seconds
        assert len(s.audio("corrupt")) == 0 and not s.frames("corrupt").any()
        # the shared wav is cut by start/end; the single-utterance files are read whole
        assert len(s.audio("part1")) == 16000 and np.allclose(s.audio("part1"), 0.5, atol=1e-3)
        assert np.allclose(s.audio("part2"), -0.25, atol=1e-3)
        assert 1.9 * 16000 < len(s.audio("good")) < 2.3 * 16000


def test_long_clip_mask_policy(tmp_path):
    m = bad_media_manifest(tmp_path)
    summary = decode_dataset(m, tmp_path / "media.h5", DecodeParams(frames=2, size=16, max_clip_seconds=4.0,
                                                                    long_clip="mask"))
    assert {(q["utt_id"], q["modality"]) for q in summary["problems"] if q["utt_id"] == "long"} == \
        {("long", "audio"), ("long", "visual")}
    assert all(q["action"] == "masked" for q in summary["problems"] if q["utt_id"] == "long")


def test_fail_policy_names_utterance_and_file(tmp_path):
    m = bad_media_manifest(tmp_path)
    with pytest.raises(MediaError, match=r"corrupt: unreadable audio .*corrupt\.mp4"):
        decode_dataset(m, tmp_path / "media.h5", DecodeParams(frames=2, size=16, on_bad_media="fail", chunk_size=1))
    assert not (tmp_path / "media.h5").exists()            # no half-written store
    assert (tmp_path / "media.h5.partial" / "chunk_000000.npz").exists()  # the finished chunk is kept
