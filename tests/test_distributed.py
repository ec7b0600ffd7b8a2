"""extract under torchrun: N ranks (gloo, CPU) fill one store's .partial folder, rank 0 assembles; the store
is byte for byte the single process's, a rank killed part-way loses only chunks in flight, and the extract
stage re-runs itself under torchrun when its encoder asks for `procs: 2`."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO
from pipeline import distributed
from pipeline.encoders import build_encoder
from pipeline.extract import extract
from pipeline.store import ChunkedRun, FeatureStore

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {repo!r})
    from pipeline import distributed
    from pipeline.encoders import build_encoder
    from pipeline.extract import extract
    from pipeline.manifest import Manifest
    job = json.loads(sys.argv[1])
    r = distributed.ranks()
    with open(os.path.join(job["out"], f"rank{{r.rank}}.pid"), "w") as f:   # so that a test can kill a rank
        f.write(str(os.getpid()))
    distributed.join_group(r)   # as the stage does, before loading the model
    distributed.bind_device(r, "cpu", "test")
    time.sleep(job.get("late", {{}}).get(str(r.rank), 0))   # a rank that comes late (or never, for the timeout)
    manifest = Manifest.load(job["manifest"])
    for name, raw in job["encoders"].items():
        enc = build_encoder(name, raw)
        if job.get("sleep"):   # slow chunks, so that a rank can be killed in the middle of the run
            encode = enc.encode
            enc.encode = lambda *a, **k: (time.sleep(job["sleep"]), encode(*a, **k))[1]
        s = extract(manifest, enc, os.path.join(job["out"], name + ".h5"), job.get("media"), job["chunk_size"])
        print("SUMMARY", r.rank, name, json.dumps({{k: v for k, v in s.items() if k != "problems"}}), flush=True)
""")


def torchrun(tmp_path, job: dict, procs: int = 2, env_extra: dict | None = None) -> subprocess.Popen:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO)))
    cmd = distributed.torchrun_command("x", [], procs)
    cmd = cmd[:cmd.index("-m", 2)] + [str(script), json.dumps(job)]   # a script, not a module
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ERCFLOW_DIST_TIMEOUT": "60", **(env_extra or {})}
    return subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def same_store(a: Path, b: Path) -> None:
    """Same rows in the same order, same bytes in every per-row dataset."""
    with FeatureStore(a) as x, FeatureStore(b) as y:
        assert x.utt_ids == y.utt_ids
        assert sorted(x.file) == sorted(y.file)
        for k in x.file:
            if k in ("utt_id", "problems"):
                continue
            u, v = x.file[k][()], y.file[k][()]
            assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), k
        assert x.problems() == y.problems()
        assert x.attrs["fingerprint"] == y.attrs["fingerprint"]


def encoders(tiny_bert):
    return {"text": {"kind": "hf_text", "weights": tiny_bert, "input_format": "indi_context", "context_window": 3,
                     "pooling": "mean", "max_length": 48, "batch_size": 4, "device": "cpu", "return_sequence": True},
            "c3d": {"kind": "cnn3d", "width": 4, "out_dim": 16, "frames": 4, "batch_size": 4, "device": "cpu"},
            "egemaps": {"kind": "opensmile", "workers": 0}}


def test_two_ranks_write_the_single_process_store(tiny_bert, sample_manifest, sample_media, tmp_path):
    sample_manifest.save(tmp_path / "manifest")
    (tmp_path / "dist").mkdir()
    job = {"out": str(tmp_path / "dist"), "manifest": str(tmp_path / "manifest"), "media": str(sample_media),
           "encoders": encoders(tiny_bert), "chunk_size": 5}
    proc = torchrun(tmp_path, job)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    for name, raw in encoders(tiny_bert).items():
        extract(sample_manifest, build_encoder(name, raw), tmp_path / f"{name}.h5", sample_media, chunk_size=5)
        same_store(tmp_path / "dist" / f"{name}.h5", tmp_path / f"{name}.h5")
    with FeatureStore(tmp_path / "dist" / "text.h5") as s:
        assert s.has("seq") and s.has("seq_offsets")   # the ragged per-token features too


def test_a_killed_rank_loses_only_chunks_in_flight_and_a_rerun_resumes(tiny_bert, sample_manifest, tmp_path):
    sample_manifest.save(tmp_path / "manifest")
    (tmp_path / "dist").mkdir()
    text = {"text": encoders(tiny_bert)["text"]}
    n_chunks = -(-len(sample_manifest) // 2)
    job = {"out": str(tmp_path / "dist"), "manifest": str(tmp_path / "manifest"), "encoders": text,
           "chunk_size": 2, "sleep": 0.4}
    proc = torchrun(tmp_path, job)
    partial = tmp_path / "dist" / "text.h5.partial"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("chunk_*.npz"))) < 4 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(int((tmp_path / "dist" / "rank1.pid").read_text()), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]          # torchrun ends the other rank and fails
    assert not (tmp_path / "dist" / "text.h5").exists()   # never a half store under the final name
    done = sorted(int(f.name[6:12]) for f in partial.glob("chunk_*.npz"))
    assert 4 <= len(done) < n_chunks, done
    assert {i % 2 for i in done} == {0, 1}            # both ranks' finished chunks are kept
    # the re-run (2 ranks again) computes exactly the chunks that were missing
    job["sleep"] = 0
    proc = torchrun(tmp_path, job)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    summary = next(json.loads(line.split(" ", 3)[3]) for line in out.splitlines() if line.startswith("SUMMARY 0 "))
    assert summary["chunks_computed"] == n_chunks - len(done)
    extract(sample_manifest, build_encoder("text", text["text"]), tmp_path / "text.h5", chunk_size=2)
    same_store(tmp_path / "dist" / "text.h5", tmp_path / "text.h5")


def test_a_rank_that_never_comes_is_named_after_the_timeout(tiny_bert, sample_manifest, tmp_path):
    sample_manifest.save(tmp_path / "manifest")
    (tmp_path / "dist").mkdir()
    job = {"out": str(tmp_path / "dist"), "manifest": str(tmp_path / "manifest"), "chunk_size": 5,
           "encoders": {"text": encoders(tiny_bert)["text"]}, "late": {"1": 30}}
    t0 = time.time()
    proc = torchrun(tmp_path, job, env_extra={"ERCFLOW_DIST_TIMEOUT": "3"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 28, out[-2000:]   # failed at the timeout, not after the nap
    assert "DistributedError: rank 0/2: starting " in out and "not every rank arrived within 3 s" in out, out[-3000:]
    assert "Rank 1" in out   # gloo's monitored barrier names the missing rank


def test_the_extract_stage_runs_itself_under_torchrun(tiny_bert, sample_manifest, sample_media, tmp_path):
    """`procs: 2` in params: `python -m stages.extract` (what dvc runs) relaunches itself as 2 ranks."""
    project = tmp_path / "project"
    sample_manifest.save(project / "data/manifest/sample")
    (project / "data/media").mkdir(parents=True)
    shutil.copy(sample_media, project / "data/media/sample.h5")
    text = {**encoders(tiny_bert)["text"], "procs": 2}
    (project / "params.yaml").write_text(yaml.safe_dump({"encoders": {"text": text}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "ERCFLOW_DIST_TIMEOUT": "60"}
    out = subprocess.run([sys.executable, "-m", "stages.extract", "--dataset", "sample", "--encoder", "text",
                          "--chunk-size", "5"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 processes" in out.stderr and "computed now by 2 processes" in out.stderr, out.stderr[-2000:]
    summary = json.loads((project / "data/features/sample/text.summary.json").read_text())
    assert summary["procs"] == 2 and summary["chunks_computed"] == 6
    single = {k: v for k, v in text.items() if k != "procs"}   # procs is how, not what: same fingerprint
    extract(sample_manifest, build_encoder("text", single), tmp_path / "text.h5", chunk_size=5)
    same_store(project / "data/features/sample/text.h5", tmp_path / "text.h5")


def test_ranks_share_disjoint_chunks(monkeypatch):
    for var in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.ranks() == distributed.Ranks() and not distributed.under_torchrun()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    r = distributed.ranks()
    assert (r.rank, r.world, r.main, r.distributed) == (1, 3, False, True)
    pending = [0, 2, 3, 5, 7, 8, 9]
    shares = [distributed.Ranks(k, 3).share(pending) for k in range(3)]
    assert sorted(sum(shares, [])) == pending and shares[1] == r.share(pending) == [2, 7]
    cmd = distributed.torchrun_command("stages.extract", ["--dataset", "d"], 4)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "stages.extract",
                       "--dataset", "d"]


def test_waiting_rank_names_the_missing_chunks_and_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "0.5")
    run = ChunkedRun(tmp_path / "f.h5", "fp")
    files = {run.path(i): i % 2 for i in range(4)}
    run.save(0, {"pooled": np.zeros((1, 2), np.float32), "valid": np.ones(1, bool)})
    t0 = time.monotonic()
    with pytest.raises(distributed.DistributedError, match=r"rank 0/2: assembling f\.h5: no new file for 0.5 s; 3 still "
                                                           r"missing \(chunk_000001\.npz, .*\) from rank\(s\) \[0, 1\]"):
        distributed.wait_for_files(distributed.Ranks(0, 2), files, "assembling f.h5", poll=0.05)
    assert time.monotonic() - t0 < 5
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(distributed.DistributedError, match="ERCFLOW_DIST_TIMEOUT: seconds, not 'soon'"):
        distributed.timeout_seconds()


def test_procs_is_not_part_of_the_store_identity():
    one = build_encoder("v", {"kind": "cnn3d", "width": 4, "out_dim": 8, "device": "cpu"})
    two = build_encoder("v", {"kind": "cnn3d", "width": 4, "out_dim": 8, "device": "cpu", "procs": 2})
    assert one.provenance() == two.provenance() and "procs" not in one.provenance()["config"]
