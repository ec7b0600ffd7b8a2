"""Nothing silent (issue #23): fingerprints true to the media's content, stores and bundles that know when they
are damaged, one writer per store and work dir, and one `error:` line naming the file for each fault left.
Each test perturbs one thing and asserts its effect; each fails on the code before the issue."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO
from pipeline import UserError
from pipeline.encoders import Encoder
from pipeline.extract import extract
from pipeline.manifest import Manifest, ManifestError
from pipeline.media import decode_dataset, decode_fingerprint
from pipeline.params import DecodeParams
from pipeline.store import (DiskFullError, FeatureStore, MediaStore, StoreBusy, StoreError, writer_lock)
from conftest import CountingEncoder, flip_middle
from conftest import extract_counting

DECODE = DecodeParams(frames=4, size=32, chunk_size=8)


@dataclass
class MeanConfig:
    dim: int = 2


class MediaMeanEncoder(Encoder):
    """A fake audio+video encoder: per row, the audio's mean absolute sample and the frames' mean grey level."""
    kind = "test_media_mean"
    modality = "audio"
    needs_media = True
    Config = MeanConfig
    calls = 0

    @property
    def dim(self):
        return 2

    def encode(self, rows, manifest, media=None):
        type(self).calls += 1
        x = np.array([[float(np.abs(media.audio(u)).mean()) if media.audio(u).size else 0.0,
                       float(media.frames(u).mean())] for u in rows["utt_id"]], np.float32)
        return {"pooled": x, "valid": np.ones(len(rows), bool)}, []


def copied_sample(sample_dir, sample_manifest, tmp_path) -> Manifest:
    """The sample's clips copied under tmp_path (so one can be swapped), with its manifest pointed there."""
    root = tmp_path / "raw"
    shutil.copytree(sample_dir, root)
    meta = json.loads(json.dumps(sample_manifest.meta.__dict__))
    meta["root"] = str(root)
    from pipeline.manifest import ManifestMeta

    return Manifest(sample_manifest.rows.copy(), ManifestMeta(**meta))


def one_line(e) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in msg, msg
    return msg


# -- 1. fingerprints true to content ---------------------------------------------------------------------
def test_a_swapped_clip_is_decoded_and_encoded_again(sample_dir, sample_manifest, tmp_path):
    """Same name, other content: the media store's fingerprint changes and extract recomputes, in one work
    dir as predict uses it (a reused dir gets the new features)."""
    m = copied_sample(sample_dir, sample_manifest, tmp_path)
    work = tmp_path / "work"
    media, feats = work / "media.h5", work / "features/mean.h5"
    decode_dataset(m, media, DECODE)
    MediaMeanEncoder.calls = 0
    extract(m, MediaMeanEncoder("mean", MeanConfig()), feats, media, chunk_size=4)
    assert MediaMeanEncoder.calls > 0
    with FeatureStore(feats) as s:
        before = s.pooled()
    MediaMeanEncoder.calls = 0
    assert extract(m, MediaMeanEncoder("mean", MeanConfig()), feats, media, chunk_size=4)["chunks_computed"] == 0

    rows = m.rows.reset_index(drop=True)
    a, b = rows.loc[0, "video"], rows.loc[len(rows) - 1, "video"]
    assert a != b
    old_fp = decode_fingerprint(m, DECODE, cache_from=media)
    shutil.copyfile(m.meta.root + "/" + b, m.meta.root + "/" + a)      # clip 0 now holds the last one's content
    assert decode_fingerprint(m, DECODE, cache_from=media) != old_fp
    decode_dataset(m, media, DECODE)
    summary = extract(m, MediaMeanEncoder("mean", MeanConfig()), feats, media, chunk_size=4)
    assert summary["chunks_computed"] > 0
    with FeatureStore(feats) as s:
        after = s.pooled()
    assert not np.allclose(after[0], before[0])                       # the swapped row is new
    np.testing.assert_allclose(after[0], before[len(rows) - 1], rtol=1e-6)
    np.testing.assert_array_equal(after[1:-1], before[1:-1])          # the others are what they were


def test_the_content_hashes_are_cached_by_size_and_times(sample_dir, sample_manifest, tmp_path, monkeypatch):
    m = copied_sample(sample_dir, sample_manifest, tmp_path)
    media = tmp_path / "media.h5"
    decode_dataset(m, media, DECODE)
    import pipeline.media as pm

    read = []
    real = pm.file_content_hash
    monkeypatch.setattr(pm, "file_content_hash", lambda p: read.append(p) or real(p))
    decode_fingerprint(m, DECODE, cache_from=media)
    assert read == []                                                 # nothing changed: nothing read
    clip = Path(m.meta.root) / m.rows.loc[0, "audio"]
    os.utime(clip, ns=(clip.stat().st_atime_ns, clip.stat().st_mtime_ns + 10**9))
    decode_fingerprint(m, DECODE, cache_from=media)
    assert read == [clip]


# -- 2. integrity without trusting an attribute ----------------------------------------------------------
def test_a_flipped_feature_store_is_an_error_not_up_to_date(sample_manifest, tmp_path):
    path = tmp_path / "data/features/sample/count.h5"
    extract_counting(sample_manifest, path)
    flip_middle(path, dataset="pooled")
    with pytest.raises(StoreError) as e:
        extract_counting(sample_manifest, path)                      # was: "0 chunks computed", damage kept
    msg = one_line(e)
    assert msg.startswith(str(path)) and "damaged store" in msg and "`dvc pull" in msg
    assert "`dvc repro extract@sample-count`" in msg
    with pytest.raises(StoreError, match="does not match the checksum"):
        FeatureStore(path)


def test_a_flipped_media_store_is_refused_before_use(sample_media, tmp_path):
    path = tmp_path / "data/media/sample.h5"
    path.parent.mkdir(parents=True)
    shutil.copyfile(sample_media, path)
    flip_middle(path)
    with pytest.raises(StoreError) as e:
        MediaStore(path)
    msg = one_line(e)
    assert msg.startswith(str(path)) and "`dvc repro decode@sample`" in msg


def test_a_changed_attribute_is_damage(sample_manifest, tmp_path):
    path = tmp_path / "f.h5"
    extract_counting(sample_manifest, path)
    with h5py.File(path, "a") as f:
        f.attrs["fingerprint"] = "forged"
    with pytest.raises(StoreError, match="the content of the attributes does not match"):
        FeatureStore(path)


def test_a_void_attribute_is_refused_when_the_store_opens(sample_manifest, tmp_path):
    """Was: found only when the bundle's JSON was written after a whole training run."""
    path = tmp_path / "f.h5"
    extract_counting(sample_manifest, path)
    with h5py.File(path, "a") as f:
        f.attrs["odd"] = np.void(b"\x01\x02")
    with pytest.raises(StoreError, match=r"attribute `odd` holds a void") as e:
        FeatureStore(path)
    one_line(e)


def test_a_damaged_gzip_chunk_names_the_store(sample_media, tmp_path):
    path = tmp_path / "media.h5"
    shutil.copyfile(sample_media, path)
    with h5py.File(path, "r") as f:
        info = f["frames"].id.get_chunk_info(1)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 4)
        fh.write(b"\xff" * 16)
    with pytest.raises(StoreError, match=re.escape(str(path)) + r": damaged store") as e:
        MediaStore(path)                                          # the checksum of `frames` no longer matches
    one_line(e)
    with MediaStore(path, verify=False) as s:                     # and a read of it names the file too
        with pytest.raises(StoreError, match=re.escape(str(path)) + r": damaged store: reading `frames` failed"):
            for u in s.utt_ids[:3]:
                s.frames(u)


def test_a_compressed_datasets_checksum_walks_its_chunk_index_once(tmp_path):
    """A gzip dataset's checksum reads its chunks in index order through one walk of the index (`chunk_iter`),
    the very order and checksum of the per-chunk look-up it replaced (`get_chunk_info(i)`, quadratic in the
    chunk count: a MELD-size media store has a chunk per frame row), and the look-up still serves without it."""
    from pipeline.store import checksums

    class NoChunkIter:   # an h5py / HDF5 without chunk_iter
        def __init__(self, dsid):
            self.dsid = dsid

        def __getattr__(self, name):
            if name == "chunk_iter":
                raise AttributeError(name)
            return getattr(self.dsid, name)

    with h5py.File(tmp_path / "x.h5", "w") as f:
        ds = f.create_dataset("frames", (3000, 4, 4), np.uint8, chunks=(1, 4, 4), compression="gzip")
        for i in np.random.default_rng(0).permutation(3000):   # written out of order: index order is not write order
            ds[i] = i % 251
        one_by_one = [ds.id.get_chunk_info(i).chunk_offset for i in range(ds.id.get_num_chunks())]
        assert checksums.chunk_offsets(ds.id) == one_by_one
        assert checksums.chunk_offsets(NoChunkIter(ds.id)) == one_by_one
        before = checksums.dataset_checksum(ds)
        ds[1234] = 0
        assert checksums.dataset_checksum(ds) != before


def test_media_values_are_checked_for_range(sample_media, tmp_path):
    path = tmp_path / "media.h5"
    shutil.copyfile(sample_media, path)
    with MediaStore(path) as s:
        x = s.audio(s.utt_ids[0])
        assert x.dtype == np.float32 and np.abs(x).max() <= 1.0
        u = s.utt_ids[0]
    with h5py.File(path, "a") as f:   # a sample of 6212 (the damaged store), checksums re-sealed
        f["audio"][int(f["audio_offsets"][0])] = 6212.0
        from pipeline.store import seal
        seal(f)
    with MediaStore(path) as s, pytest.raises(StoreError, match=r"not float32 samples within \[-1, 1\]"):
        s.audio(u)


def test_a_flipped_bundle_is_refused(tmp_path):
    from heads.bundle import BundleError, load_head, save_head

    meta = {"head": "late_fusion", "options": {}, "task": "categorical", "modalities": ["text"],
            "dims": {"text": 4}, "n_out": 3}
    path = save_head(tmp_path / "models/syn/late_fusion.safetensors",
                     {"w": torch.arange(4096, dtype=torch.float32)}, meta)
    load_head(path)
    data = bytearray(path.read_bytes())
    data[-5000:-4936] = bytes(b ^ 0xFF for b in data[-5000:-4936])   # in the tensor bytes, not the header
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=re.escape(str(path)) + r": damaged bundle.*`dvc pull") as e:
        load_head(path)
    one_line(e)


def test_inspect_reads_a_good_bundle_and_names_a_damaged_one(tmp_path):
    from ercflow.inspect import inspect_bundle
    from heads.bundle import save_head

    meta = {"head": "late_fusion", "options": {}, "task": "categorical", "modalities": ["text"],
            "dims": {"text": 4}, "n_out": 3}
    path = save_head(tmp_path / "m.safetensors", {"w": torch.arange(4096, dtype=torch.float32)}, meta)
    good = inspect_bundle(path)
    assert good.status != "error" and good.kind == "bundle" and good.encoder == "late_fusion", good
    flip_middle(path)
    bad = inspect_bundle(path)
    assert bad.status == "error" and "HDF5" not in " ".join(bad.reasons), bad


# -- 3. one writer at a time -----------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_first_or_waits(sample_manifest, tmp_path):
    path = tmp_path / "f.h5"
    with writer_lock(path):
        with pytest.raises(StoreBusy, match=re.escape(str(path)) + rf": being written by pid {os.getpid()}") as e:
            with writer_lock(path, timeout=0):
                pass
        one_line(e)
    done = []
    CountingEncoder.sleep = 0.05
    try:   # two extracts on one store: the second waits, then finds it up to date (was: FileNotFoundError)
        threads = [threading.Thread(target=lambda: done.append(extract_counting(sample_manifest, path)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        CountingEncoder.sleep = 0.0
    assert len(done) == 2 and sorted(d["chunks_computed"] for d in done)[0] == 0
    FeatureStore(path).close()


def test_two_extract_processes_on_one_store(sample_manifest, tmp_path):
    """Real processes (the race the issue met): both finish, the store is whole."""
    path = tmp_path / "f.h5"
    sample_manifest.save(tmp_path / "manifest")
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
            "from pipeline.manifest import Manifest\nimport test_store\n"
            "test_store.CountingEncoder.sleep = 0.1\n"
            f"print(test_store.run(Manifest.load({str(tmp_path / 'manifest')!r}), {str(path)!r})['chunks_computed'])")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(int(o[0].split()[-1]) for o in outs)[0] == 0
    FeatureStore(path).close()


# -- 4. one error line for each fault left ---------------------------------------------------------------
def test_a_full_disk_while_hdf5_closes_the_store(sample_manifest, tmp_path, monkeypatch):
    """The close that fails with ENOSPC: the file is really closed (before, h5py was left holding it and
    crashed at exit, rc 139), the temp file removed, one DiskFullError."""
    opened = []
    real_close = h5py.File.close

    def close(self):
        if self.mode == "r+" and not getattr(self, "_failed_once", False) and str(self.filename).endswith(".tmp"):
            self._failed_once = True
            opened.append(self)
            raise OSError(errno.ENOSPC, "Can't close file (file write failed: errno = 28, error message = "
                                        "'No space left on device')")
        return real_close(self)

    monkeypatch.setattr(h5py.File, "close", close)
    path = tmp_path / "f.h5"
    with pytest.raises(DiskFullError, match=re.escape(str(path)) + r": disk full") as e:
        extract_counting(sample_manifest, path)
    monkeypatch.undo()
    one_line(e)
    assert opened and not opened[0].id.valid                      # closed, nothing left for h5py at exit
    assert not (tmp_path / "f.h5.tmp").exists() and not path.exists()
    assert extract_counting(sample_manifest, path)["chunks_computed"] == 0


def test_too_little_free_space_is_refused_before_hdf5_writes(sample_manifest, tmp_path, monkeypatch):
    import pipeline.store.files as ps

    monkeypatch.setattr(ps.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskFullError, match=r"disk full .* with 1000 bytes free") as e:
        extract_counting(sample_manifest, tmp_path / "f.h5")
    one_line(e)
    assert not (tmp_path / "f.h5.tmp").exists()


def write_table(path: Path, rows: list[dict], columns) -> Path:
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def test_predict_input_checks(tmp_path):
    from ercflow.model import conversation_manifest, read_conversations

    empty = write_table(tmp_path / "empty.csv", [], ["dialogue_id", "turn", "speaker", "text"])
    df, where = read_conversations(empty)
    with pytest.raises(ManifestError, match=re.escape(str(empty)) + r": no utterances") as e:
        conversation_manifest(df, where, None, ["joy"])          # was: TypeError deep in encoders/text.py
    one_line(e)
    (tmp_path / "media").mkdir()
    outside = write_table(tmp_path / "out.csv", [{"dialogue_id": "d", "turn": 0, "speaker": "A", "text": "hi",
                                                  "video": "../elsewhere.mp4"}],
                          ["dialogue_id", "turn", "speaker", "text", "video"])
    df, where = read_conversations(outside)
    with pytest.raises(ManifestError) as e:
        conversation_manifest(df, where, tmp_path / "media", ["joy"])
    msg = one_line(e)
    assert "--allow-outside-root" in msg and "data.predict" not in msg, msg


def test_predict_work_dir_has_one_writer(tmp_path):
    work = tmp_path / "work" / "abc"
    with writer_lock(work):
        with pytest.raises(StoreBusy, match="being written by"):
            with writer_lock(work, timeout=0):
                pass


def test_a_non_utf8_metrics_file_is_one_line(tmp_path):
    (tmp_path / "results/sample/text_mlp").mkdir(parents=True)
    (tmp_path / "results/sample/text_mlp/metrics.json").write_bytes(b'{"dataset": "sample\xff\xfe"}')
    params = tmp_path / "params.yaml"
    shutil.copyfile(REPO / "params.yaml", params)
    r = subprocess.run([sys.executable, "-m", "stages.report", "--results", str(tmp_path / "results"), "--out",
                        str(tmp_path / "reports"), "--params", str(params)], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    import yaml

    p = yaml.safe_load(params.read_text())
    if "sample" not in (p.get("datasets") or []) or "text_mlp" not in (p.get("train") or []):
        pytest.skip("params.yaml does not train text_mlp on sample")
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "metrics.json: not UTF-8" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_replaced_onnx_cache_file_is_one_error(tmp_path, monkeypatch):
    import pipeline.onnx_runtime as ort_mod

    folder = tmp_path / "onnx" / "key"
    folder.mkdir(parents=True)
    (folder / ort_mod.GRAPH).write_bytes(b"not a protobuf at all")
    digest = ort_mod.file_sha256(folder / ort_mod.GRAPH)   # a consistent sidecar: the cache "verifies"
    (folder / ort_mod.SIDECAR).write_text(json.dumps({"files": {ort_mod.GRAPH: digest}}))
    monkeypatch.setenv("ERCFLOW_ONNX_CACHE", str(tmp_path / "onnx"))
    model = object.__new__(ort_mod.OnnxModel)
    model.sessions = {}
    monkeypatch.setattr(ort_mod.OnnxModel, "key", lambda self, example, hidden: "key")
    with pytest.raises(UserError, match=re.escape(str(folder / ort_mod.GRAPH)) + r": not a loadable ONNX graph"
                                        r".*delete") as e:
        model.session({}, False)
    one_line(e)


def test_pickled_transformers_weights_are_refused_by_name(tiny_bert, tmp_path):
    from pipeline.runtime import PickledWeights, safetensors_only

    d = tmp_path / "w"
    shutil.copytree(tiny_bert, d)
    assert safetensors_only(str(d)) == {"use_safetensors": True}
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    with pytest.raises(PickledWeights, match=re.escape(str(d / "pytorch_model.bin")) + r": pickled weights") as e:
        safetensors_only(str(d))
    one_line(e)


def test_a_cut_utterance_is_a_problem(tiny_bert, sample_manifest, tmp_path):
    from pipeline.encoders import build_encoder

    rows = sample_manifest.rows.copy()
    rows.loc[0, "text"] = " ".join(["happy"] * 2500)                  # a 5,000-character utterance
    m = Manifest(rows, sample_manifest.meta)
    enc = build_encoder("t", {"kind": "hf_text", "weights": tiny_bert, "max_length": 32, "device": "cpu"})
    summary = extract(m, enc, tmp_path / "t.h5")
    cut = [q for q in summary["problems"] if q["utt_id"] == rows.loc[0, "utt_id"]]
    assert len(cut) == 1 and cut[0]["action"] == "trimmed" and "max_length" in cut[0]["problem"], summary["problems"]
    assert len(summary["problems"]) == 1
    with FeatureStore(tmp_path / "t.h5") as s:
        assert s.problems() == cut                                    # kept in the store: inspect counts it
