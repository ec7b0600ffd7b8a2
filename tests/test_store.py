import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO
from pipeline.store import FeatureStore, MediaStore, StoreError, what_to_do
from conftest import CountingConfig, CountingEncoder, extract_counting as run


def test_interrupted_extraction_resumes_from_finished_chunks(sample_manifest, tmp_path):
    n_chunks = -(-len(sample_manifest) // 4)
    assert n_chunks >= 4
    with pytest.raises(KeyboardInterrupt):
        run(sample_manifest, tmp_path / "f.h5", fail_on_call=3)
    assert not (tmp_path / "f.h5").exists()                     # never a half store under the final name
    assert len(list((tmp_path / "f.h5.partial").glob("chunk_*.npz"))) == 2
    summary = run(sample_manifest, tmp_path / "f.h5")
    assert summary["chunks_computed"] == n_chunks - 2 == CountingEncoder.calls
    assert not (tmp_path / "f.h5.partial").exists()
    run(sample_manifest, tmp_path / "ref.h5")
    with FeatureStore(tmp_path / "f.h5") as a, FeatureStore(tmp_path / "ref.h5") as b:
        np.testing.assert_array_equal(a.pooled(), b.pooled())
        assert a.utt_ids == sample_manifest.utt_ids
    # same config again: a no-op; another config: recomputed
    assert run(sample_manifest, tmp_path / "f.h5")["chunks_computed"] == 0 and CountingEncoder.calls == 0
    assert run(sample_manifest, tmp_path / "f.h5", dim=4)["chunks_computed"] == n_chunks


def test_chunks_of_another_config_are_discarded(sample_manifest, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(sample_manifest, tmp_path / "f.h5", fail_on_call=3)
    summary = run(sample_manifest, tmp_path / "f.h5", dim=5)
    assert summary["chunks_computed"] == -(-len(sample_manifest) // 4)
    with FeatureStore(tmp_path / "f.h5") as s:
        assert s.dim == 3 and (s.pooled()[:, 2] == 5).all()


def test_sigkill_half_way_then_resume(sample_manifest, tmp_path):
    """A real process killed with SIGKILL in the middle of extraction; the re-run redoes no finished chunk."""
    sample_manifest.save(tmp_path / "manifest")
    script = textwrap.dedent(f"""
        import sys, json
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
        from conftest import CountingEncoder, CountingConfig
        from pipeline.extract import extract
        from pipeline.manifest import Manifest
        m = Manifest.load({str(tmp_path / 'manifest')!r})
        CountingEncoder.sleep = float(sys.argv[1])
        s = extract(m, CountingEncoder("count", CountingConfig()), {str(tmp_path / 'f.h5')!r},
                    chunk_size=4)
        print(json.dumps({{"computed": s["chunks_computed"]}}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, "0.3"], stdout=subprocess.PIPE)
    partial = tmp_path / "f.h5.partial"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(partial.glob("chunk_*.npz"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(partial.glob("chunk_*.npz")))
    n_chunks = -(-len(sample_manifest) // 4)
    assert 2 <= done_before < n_chunks
    out = subprocess.run([sys.executable, "-c", script, "0"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["computed"] == n_chunks - done_before
    with FeatureStore(tmp_path / "f.h5") as s:
        assert s.utt_ids == sample_manifest.utt_ids


def test_reading_by_split_and_dialogue(sample_manifest, tmp_path):
    run(sample_manifest, tmp_path / "f.h5")
    with FeatureStore(tmp_path / "f.h5") as s:
        dev = sample_manifest.split_rows("dev")
        np.testing.assert_array_equal(s.split(sample_manifest, "dev")[:, 1], dev.index.to_numpy())
        dialogues = s.by_dialogue(sample_manifest, "test")
        assert [len(d) for d in dialogues] == [len(i) for i in sample_manifest.dialogues("test")]
        attrs = s.attrs
        for key in ("encoder", "encoder_kind", "config_hash", "code_version", "fingerprint", "dtype", "dataset"):
            assert key in attrs
        with pytest.raises(StoreError, match="not in the store"):
            s.pooled(["nope"])
    with pytest.raises(StoreError, match="store not found"):
        FeatureStore(tmp_path / "absent.h5")


def test_what_to_do_names_the_dvc_output_and_the_stage(tmp_path):
    assert what_to_do("data/media/meld.h5") == ("re-pull it with `dvc pull data/media/meld.h5`, or delete "
                                                "data/media/meld.h5 and re-run `dvc repro decode@meld`")
    assert "`dvc repro extract@meld-wavlm`" in what_to_do("data/features/meld/wavlm.h5")
    (tmp_path / "models/meld/teacher").mkdir(parents=True)   # a teacher store: its stage is finetune_text
    assert "`dvc repro finetune_text@meld-teacher`" in what_to_do(tmp_path / "data/features/meld/teacher.h5")
    assert "`dvc repro train@meld-matav`" in what_to_do("models/meld/matav.safetensors")
    hint = what_to_do("models/meld/teacher/best/classifier.safetensors", delete="models/meld/teacher/best")
    assert hint == ("re-pull it with `dvc pull models/meld/teacher`, or delete models/meld/teacher/best and re-run "
                    "`dvc repro finetune_text@meld-teacher`")


def test_a_store_missing_an_utterance_names_the_file(sample_manifest, sample_media, tmp_path):
    run(sample_manifest, tmp_path / "f.h5")
    with FeatureStore(tmp_path / "f.h5") as s:
        s.require(sample_manifest.utt_ids)
        with pytest.raises(StoreError, match=r"f\.h5: 1 of the manifest's utterance\(s\) not in the store"):
            s.require(sample_manifest.utt_ids + ["nope"])
    with MediaStore(sample_media) as s:   # an encoder reading media of an utterance the store lacks
        assert len(s.audio(sample_manifest.utt_ids[0])) > 0
        with pytest.raises(StoreError, match=re.escape(str(sample_media)) + r": .* e\.g\. \['nope'\]"):
            s.frames("nope")


def test_chunks_computed_by_several_runs_side_by_side(sample_manifest, tmp_path):
    """Two runs of one fingerprint fill one .partial folder, each its own chunks (as torchrun ranks do); the
    second opening leaves the first's chunks alone, and the assembled store is the single run's."""
    from pipeline.store import ChunkedRun, StoreLayout, assemble, chunk_bounds, run_chunks

    n, size = len(sample_manifest), 4
    enc = CountingEncoder("count", CountingConfig())
    compute = lambda s, e: enc.encode(sample_manifest.rows.iloc[s:e], sample_manifest)   # noqa: E731
    a = ChunkedRun(tmp_path / "f.h5", "fp")
    assert run_chunks(a, n, size, compute, chunks=[0, 2, 4])[0] == 3
    b = ChunkedRun(tmp_path / "f.h5", "fp")   # another rank opens the folder: nothing is discarded
    n_chunks = len(chunk_bounds(n, size))
    assert run_chunks(b, n, size, compute, chunks=[i for i in range(n_chunks) if i not in (0, 2, 4)])[0] == n_chunks - 3
    assemble(b, sample_manifest.utt_ids, n_chunks, StoreLayout(fixed=["pooled"]), {"fingerprint": "fp"})
    run(sample_manifest, tmp_path / "ref.h5")
    with FeatureStore(tmp_path / "f.h5") as x, FeatureStore(tmp_path / "ref.h5") as y:
        assert x.pooled().tobytes() == y.pooled().tobytes() and x.utt_ids == y.utt_ids
    assert not ChunkedRun(tmp_path / "g.h5", "fp").done(0)
    ChunkedRun(tmp_path / "g.h5", "fp").save(0, {"pooled": np.zeros((1, 3), np.float32), "valid": np.ones(1, bool)})
    assert not ChunkedRun(tmp_path / "g.h5", "other").done(0)   # another fingerprint: chunks discarded
