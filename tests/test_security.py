"""The trust boundary (docs/security.md): what arrives through the DVC remote is data. Nothing in it is unpickled
or executed; a damaged, foreign or half-written file fails with an error naming it and what to do; a full
disk is one clear error that leaves no temp file and keeps finished work, so a re-run resumes."""
import errno
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from conftest import REPO
from heads.registry import build_head
from heads.bundle import BundleError, load_head, load_trained_head, save_head
from heads.data import CachedDialogues
from pipeline.configs import TextFinetuneParams
from pipeline.finetune.checkpoint import CheckpointError
from pipeline.finetune.kinds import TextFinetuner
from pipeline.store import DiskFullError, FeatureStore, StoreError, atomic_write_text
from conftest import CountingEncoder
from conftest import extract_counting
from conftest import store_from, synthetic_manifest


class Payload:
    """Unpickling this runs a shell command that creates `marker` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"classifier": Payload(marker), "state": Payload(marker)}, path)
    return path


def test_the_payload_is_live(tmp_path):
    """Control: the planted files below really run code when unpickled, so their refusal means something."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# -- fine-tune checkpoints ---------------------------------------------------------------------------------
def ft_params(tiny_bert, **kw):
    return TextFinetuneParams(**{**dict(weights=tiny_bert, context_window=3, max_length=48, lr=2e-3, warmup_steps=2,
                                    epochs=1, batch_size=8, device="cpu", dropout=0.0, save_every_steps=0), **kw})


@pytest.fixture(scope="module")
def checkpoints(tiny_bert, sample_manifest, tmp_path_factory) -> Path:
    """`best` and `last` of a one-epoch fine-tune (copied by each test that spoils them)."""
    ckpt = tmp_path_factory.mktemp("ft") / "models/sample/teacher"
    TextFinetuner(sample_manifest, ft_params(tiny_bert), ckpt).train(log=lambda *_: None)
    assert (ckpt / "best/checkpoint.json").exists() and (ckpt / "last/training_state.json").exists()
    return ckpt


def tuner_on_copy(checkpoints, tiny_bert, sample_manifest, tmp_path) -> TextFinetuner:
    ckpt = tmp_path / "models/sample/teacher"
    shutil.copytree(checkpoints, ckpt)
    return TextFinetuner(sample_manifest, ft_params(tiny_bert), ckpt)


def resume(tuner):
    return tuner.train(log=lambda *_: None)


def load_best(tuner):
    return tuner.load("best")


@pytest.mark.parametrize("where, read", [
    ("last/classifier.pt", resume),                 # the reported exploit: the checkpoint format before v1
    ("last/training_state.pt", resume),             # a pickle slipped into a good `last`
    ("last/training_state.safetensors", resume),    # a pickle named like safetensors
    ("best/classifier.pt", load_best),
    ("best/encoder/pytorch_model.bin", load_best),  # transformers' pickled weights
    ("best/classifier.safetensors", load_best),
    ("best/encoder/model.safetensors", load_best),
])
def test_a_pickled_checkpoint_is_refused_and_never_runs(checkpoints, tiny_bert, sample_manifest, tmp_path, where,
                                                        read):
    tuner = tuner_on_copy(checkpoints, tiny_bert, sample_manifest, tmp_path)
    marker = tmp_path / "pwned"
    target = plant(tuner.ckpt / where, marker)
    with pytest.raises(CheckpointError, match=re.escape(str(target))) as e:
        read(tuner)
    assert not marker.exists()
    assert "\n" not in str(e.value) and "dvc pull" in str(e.value) and "finetune_text@sample-teacher" in str(e.value)


def test_an_old_format_checkpoint_dir_is_refused_at_the_stage_start(tiny_bert, sample_manifest, tmp_path):
    """What the reporter saw: `last` holding only the pre-v1 pickles; the stage refuses before training."""
    ckpt = tmp_path / "models/sample/teacher_minilm"
    marker = tmp_path / "pwned"
    plant(ckpt / "last/classifier.pt", marker)
    plant(ckpt / "last/training_state.pt", marker)
    tuner = TextFinetuner(sample_manifest, ft_params(tiny_bert), ckpt)
    with pytest.raises(CheckpointError, match=r"last/classifier\.pt: refused: a pickle"):
        tuner.resumable()
    assert not marker.exists()


@pytest.mark.parametrize("spoil, match", [
    ("best/classifier.safetensors", "not a readable safetensors file"),
    ("best/encoder/model.safetensors", "not a readable safetensors file"),
    ("best/checkpoint.json", "missing or damaged"),
    ("last/training_state.safetensors", "not a readable safetensors file"),
])
def test_a_truncated_checkpoint_names_the_file(checkpoints, tiny_bert, sample_manifest, tmp_path, spoil, match):
    tuner = tuner_on_copy(checkpoints, tiny_bert, sample_manifest, tmp_path)
    f = tuner.ckpt / spoil
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=match) as e:
        resume(tuner) if spoil.startswith("last") else tuner.load("best")
    assert str(e.value).startswith(str(f)) and "dvc pull" in str(e.value)


def test_a_foreign_or_newer_checkpoint_is_refused(checkpoints, tiny_bert, sample_manifest, tmp_path):
    tuner = tuner_on_copy(checkpoints, tiny_bert, sample_manifest, tmp_path)
    meta_file = tuner.ckpt / "best/checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(CheckpointError, match="format_version 2.*upgrade ercflow"):
        tuner.load("best")
    meta_file.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an ercflow fine-tune checkpoint"):
        tuner.load("best")


def test_a_full_disk_while_checkpointing_keeps_the_old_checkpoint(checkpoints, tiny_bert, sample_manifest, tmp_path,
                                                                 monkeypatch):
    tuner = tuner_on_copy(checkpoints, tiny_bert, sample_manifest, tmp_path)
    before = {f: f.read_bytes() for f in (tuner.ckpt / "best").rglob("*") if f.is_file()}

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)   # half a file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr("pipeline.finetune.checkpoint.save_file", full)
    with pytest.raises(DiskFullError) as e:
        tuner.save("best")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(tuner.ckpt / "best")) and "free space" in msg and "resumes" in msg
    assert not (tuner.ckpt / ".best.tmp").exists()
    assert {f: f.read_bytes() for f in (tuner.ckpt / "best").rglob("*") if f.is_file()} == before


# -- head bundles ------------------------------------------------------------------------------------------
HEAD_OPTIONS = {
    "late_fusion": {"hidden": 16, "dropout": 0.0},
    "dialoguetrm": {"d_model": 16, "intra_layers": 1, "intra_heads": 2, "inter_layers": 1, "inter_heads": 2,
                    "window": 3, "dropout": 0.0},
    "telme": {"heads": 2, "dropout": 0.0},
    "matav": {"d_model": 16, "attention_layers": 1, "heads": 2, "queue_size": 8, "dropout": 0.0},
}


@pytest.fixture(scope="module")
def three_modalities(tmp_path_factory):
    d = tmp_path_factory.mktemp("heads")
    m = synthetic_manifest(n_dialogues=8, turns=5)
    rng = np.random.default_rng(0)
    emb = {u: rng.normal(size=12) for u in m.utt_ids}
    stores = {"text": store_from(m, d / "t.h5", lambda r: emb[r["utt_id"]][:8], 8),
              "audio": store_from(m, d / "a.h5", lambda r: emb[r["utt_id"]][4:], 8),
              "visual": store_from(m, d / "v.h5", lambda r: emb[r["utt_id"]][::2], 6)}
    return m, CachedDialogues(m, stores)


def trained_head(name, data, seed=0):
    torch.manual_seed(seed)
    head = build_head(name, {k: data.dim(k) for k in data.modalities}, 3, "categorical", HEAD_OPTIONS[name])
    head.prepare(data)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    batch = data.batch(data.dialogues("train")[:3])
    for _ in range(3):   # a few steps: weights that no fresh build has
        loss, _ = head.loss(batch, head(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def bundle_meta(name, data):
    return {"head": name, "options": HEAD_OPTIONS[name], "task": "categorical", "modalities": data.modalities,
            "dims": {k: data.dim(k) for k in data.modalities}, "n_out": 3, "labels": data.labels,
            "features": data.provenance}


@pytest.mark.parametrize("name", list(HEAD_OPTIONS))
def test_a_saved_head_reloads_to_identical_outputs(three_modalities, tmp_path, name):
    m, data = three_modalities
    head = trained_head(name, data).eval()
    path = save_head(tmp_path / f"models/syn/{name}.safetensors", head.state_dict(), bundle_meta(name, data))
    assert not list(path.parent.glob("*.tmp"))
    state, meta = load_head(path)
    assert meta["format"] == "ercflow.head" and meta["format_version"] == 1 and meta["head"] == name
    assert meta["features"]["text"]["encoder"] == "fn" and meta["labels"] == ["a", "b", "c"]
    again = load_trained_head(path)
    assert not again.training
    batch = data.batch(data.dialogues("test"))
    with torch.no_grad():
        assert torch.equal(head(batch), again(batch))


def test_a_pickled_or_old_head_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    for f in (tmp_path / "models/syn/text_mlp.safetensors", tmp_path / "models/syn/text_mlp.pt"):
        plant(f, marker)
        with pytest.raises(BundleError, match=re.escape(str(f)) + ": not a readable safetensors file"):
            load_head(f)
        with pytest.raises(BundleError, match=re.escape(str(f))):
            load_trained_head(f)
    assert not marker.exists()


def test_predict_refuses_a_pickled_model_and_never_runs_it(tmp_path):
    """What `ercflow predict --model` and `load_model` read is a bundle: a pickle there is refused by name."""
    from ercflow.model import load_model

    marker = tmp_path / "pwned"
    for f in (tmp_path / "model.safetensors", tmp_path / "model.pt"):
        plant(f, marker)
        with pytest.raises(BundleError, match=re.escape(str(f))):
            load_model(f, work_dir=tmp_path / "w")
    out = subprocess.run([sys.executable, "-m", "ercflow", "predict", "--model", str(tmp_path / "model.pt"),
                          "--input", str(tmp_path / "none.csv")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and "model.pt" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


def test_a_truncated_foreign_or_newer_bundle_is_refused(three_modalities, tmp_path):
    m, data = three_modalities
    path = save_head(tmp_path / "models/syn/late_fusion.safetensors", trained_head("late_fusion", data).state_dict(),
                     bundle_meta("late_fusion", data))
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(BundleError, match=re.escape(str(path)) + ".*`dvc pull .*`dvc repro train@syn-late_fusion`"):
        load_head(path)
    save_file({"w": torch.zeros(2)}, path)                              # someone else's safetensors
    with pytest.raises(BundleError, match="not an ercflow head bundle"):
        load_head(path)
    save_file({"w": torch.zeros(2)}, path, metadata={"ercflow": json.dumps(
        {**bundle_meta("late_fusion", data), "format": "ercflow.head", "format_version": 2})})
    with pytest.raises(BundleError, match="format_version 2.*upgrade ercflow"):
        load_head(path)
    save_file({"w": torch.zeros(2)}, path, metadata={"ercflow": json.dumps(
        {**bundle_meta("late_fusion", data), "format": "ercflow.head", "format_version": 1})})
    with pytest.raises(BundleError, match="do not fit head 'late_fusion'"):
        load_trained_head(path)


def test_a_full_disk_while_saving_a_head_keeps_the_old_bundle(three_modalities, tmp_path, monkeypatch):
    m, data = three_modalities
    head = trained_head("late_fusion", data)
    path = save_head(tmp_path / "late_fusion.safetensors", head.state_dict(), bundle_meta("late_fusion", data))
    before = path.read_bytes()

    def full(tensors, filename, metadata=None):   # what safetensors raises on a full disk (seen on a tmpfs)
        Path(filename).write_bytes(b"\0" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("heads.bundle.save_file", full)
    full_msg = re.escape(str(path)) + r": disk full \(No space left on device\) while writing [\d.]+ KiB; free space"
    with pytest.raises(DiskFullError, match=full_msg) as e:
        save_head(path, head.state_dict(), bundle_meta("late_fusion", data))
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


# -- the package never unpickles -------------------------------------------------------------------------
FORBIDDEN = {
    r"weights_only\s*=\s*False": "torch.load(weights_only=False) unpickles",
    r"\bpickle\.loads?\(": "pickle.load unpickles",
    r"allow_pickle\s*=\s*True": "np.load(allow_pickle=True) unpickles",
    r"trust_remote_code\s*=\s*True": "trust_remote_code runs a model repository's code",
    r"\b(?:joblib|dill|cloudpickle|shelve)\.(?:load|open)\(|read_pickle\(": "unpickles",
    r"yaml\.unsafe_load|Loader\s*=\s*yaml\.(?:Unsafe)?Loader\b": "a YAML loader that builds Python objects",
}
TORCH_LOAD = re.compile(r"torch\.load\((?:[^()]|\([^()]*\))*\)")


def forbidden_calls(text: str) -> list[str]:
    found = [f"{m.group(0)!r}: {why}" for pattern, why in FORBIDDEN.items() for m in re.finditer(pattern, text)]
    found += [f"{m.group(0)!r}: torch.load without weights_only=True" for m in TORCH_LOAD.finditer(text)
              if not re.search(r"weights_only\s*=\s*True", m.group(0))]
    return found


def test_the_scan_catches_what_it_looks_for():
    for bad in ("torch.load(f, weights_only=False)", "torch.load(open(p), map_location='cpu')", "pickle.load(fh)",
                "np.load(p, allow_pickle=True)", "AutoModel.from_pretrained(p, trust_remote_code=True)",
                "pd.read_pickle(p)", "yaml.load(f, Loader=yaml.Loader)"):
        assert forbidden_calls(bad), bad
    assert not forbidden_calls("torch.load(p, map_location='cpu', weights_only=True)")
    assert not forbidden_calls("np.load(p, allow_pickle=False); yaml.safe_load(f); trust_remote_code=False")


def test_the_package_source_never_unpickles_or_runs_remote_code():
    files = [f for d in ("pipeline", "heads", "stages", "ercflow", "bench") for f in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    bad = [f"{f.relative_to(REPO)}: {hit}" for f in files for hit in forbidden_calls(f.read_text())]
    assert not bad, "\n".join(bad)


# -- damaged and foreign stores --------------------------------------------------------------------------
@pytest.fixture()
def store(sample_manifest, tmp_path) -> Path:
    path = tmp_path / "data/features/sample/count.h5"
    extract_counting(sample_manifest, path)
    return path


def open_fails(path, *match):
    with pytest.raises(StoreError) as e:
        FeatureStore(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    for m in match:
        assert re.search(m, msg), (m, msg)
    return msg


def test_a_truncated_store_names_the_file_and_what_to_do(store):
    store.write_bytes(store.read_bytes()[:store.stat().st_size // 2])
    open_fails(store, "truncated", re.escape(f"`dvc pull {store}`"), "`dvc repro extract@sample-count`")


def test_a_file_that_is_not_an_ercflow_store(store, tmp_path):
    with h5py.File(store, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    open_fails(store, r"not an ercflow store \(no `utt_id` dataset")
    with h5py.File(store, "w") as f:
        f.create_dataset("utt_id", data=np.array(["a"], dtype=object), dtype=h5py.string_dtype())
    open_fails(store, r"not an ercflow store \(no attribute\(s\) \['rows', 'fingerprint', 'code_version'\]")
    plant(store, tmp_path / "pwned")
    open_fails(store, "not a readable HDF5 file: not an HDF5 file")
    assert not (tmp_path / "pwned").exists()


def test_a_store_with_a_wrong_row_count(store):
    with h5py.File(store, "a") as f:
        pooled = f["pooled"][:]
        del f["pooled"]
        f.create_dataset("pooled", data=pooled[:-2])
    open_fails(store, r"wrong row count: `pooled` has \d+ rows, `utt_id` \d+", "dvc pull")


def test_a_store_of_another_manifest_is_refused_when_a_head_reads_it(tmp_path):
    full, fewer = synthetic_manifest(n_dialogues=12), synthetic_manifest(n_dialogues=8)
    path = store_from(fewer, tmp_path / "data/features/syn/text.h5", lambda r: np.ones(4), 4)
    with pytest.raises(StoreError, match=re.escape(path) + r": \d+ of the manifest's utterance\(s\) not in the "
                                         r"store .*`dvc pull .*`dvc repro extract@syn-text`"):
        CachedDialogues(full, {"text": path})


# -- a full disk -----------------------------------------------------------------------------------------
def store_arrays(path) -> tuple:
    with FeatureStore(path) as s:
        return ({k: s.file[k][()] for k in s.file}, s.attrs)


def same_store(a, b):
    (da, aa), (db, ab) = store_arrays(a), store_arrays(b)
    assert set(da) == set(db) and aa == ab
    for k in da:
        np.testing.assert_array_equal(da[k], db[k])


def test_a_full_disk_while_saving_chunks_keeps_finished_chunks_and_resumes(sample_manifest, tmp_path, monkeypatch):
    path, n_chunks = tmp_path / "f.h5", -(-len(sample_manifest) // 4)
    real, calls = np.savez, []

    def savez(file, **arrays):
        calls.append(file)
        if len(calls) == 3:
            Path(file).write_bytes(b"PK\3\4 half a chunk")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(file, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(DiskFullError) as e:
        extract_counting(sample_manifest, path)
    monkeypatch.undo()
    msg, partial = str(e.value), tmp_path / "f.h5.partial"
    assert "\n" not in msg and msg.startswith(str(partial / "chunk_000002.npz") + ": disk full (No space left")
    assert "bytes; free space" in msg and f"finished chunks in {partial} are kept" in msg
    assert sorted(f.name for f in partial.glob("chunk_*.npz")) == ["chunk_000000.npz", "chunk_000001.npz"]
    assert not [f for f in partial.iterdir() if "tmp" in f.name] and not path.exists()
    summary = extract_counting(sample_manifest, path)
    assert summary["chunks_computed"] == n_chunks - 2 == CountingEncoder.calls
    extract_counting(sample_manifest, tmp_path / "ref.h5")
    same_store(path, tmp_path / "ref.h5")


def full_on_dataset(n_ok: int):
    class FullFile(h5py.File):
        """An HDF5 file on a disk that fills up after `n_ok` datasets."""
        created = 0

        def create_dataset(self, *a, **kw):
            type(self).created += 1
            if type(self).created > n_ok:
                raise OSError(errno.ENOSPC, "Can't write data (file write failed: errno = 28, error message = "
                                            "'No space left on device')")
            return super().create_dataset(*a, **kw)
    return FullFile


def test_a_full_disk_while_assembling_keeps_every_chunk(sample_manifest, tmp_path, monkeypatch):
    path = tmp_path / "f.h5"
    monkeypatch.setattr(h5py, "File", full_on_dataset(2))
    with pytest.raises(DiskFullError, match=re.escape(str(path)) + r": disk full .*assembled again") as e:
        extract_counting(sample_manifest, path)
    monkeypatch.undo()
    assert "\n" not in str(e.value) and not path.exists() and not (tmp_path / "f.h5.tmp").exists()
    assert len(list((tmp_path / "f.h5.partial").glob("chunk_*.npz"))) == -(-len(sample_manifest) // 4)
    assert extract_counting(sample_manifest, path)["chunks_computed"] == 0   # assembled from the kept chunks
    extract_counting(sample_manifest, tmp_path / "ref.h5")
    same_store(path, tmp_path / "ref.h5")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_real_enospc_from_hdf5(sample_manifest, tmp_path):
    """No monkeypatch: the store's temp name points at /dev/full, where every write fails with ENOSPC."""
    path = tmp_path / "f.h5"
    (tmp_path / "f.h5.tmp").symlink_to("/dev/full")
    with pytest.raises(DiskFullError, match=re.escape(str(path)) + r": disk full \(No space left on device\)"):
        extract_counting(sample_manifest, path)
    assert not (tmp_path / "f.h5.tmp").is_symlink() and not path.exists()
    assert extract_counting(sample_manifest, path)["chunks_computed"] == 0


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_while_writing_text_leaves_the_old_file(tmp_path, monkeypatch, code):
    target = tmp_path / "results/metrics.json"
    atomic_write_text(target, "old")

    def write_text(self, text, *a, **kw):
        Path.write_bytes(self, text[:3].encode())
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(DiskFullError) as e:
        atomic_write_text(target, "new and longer")
    monkeypatch.undo()
    assert str(e.value).startswith(f"{target}: disk full ({os.strerror(code)}) while writing 14 bytes; free space")
    assert "\n" not in str(e.value)
    assert target.read_text() == "old" and not (tmp_path / "results/metrics.json.tmp").exists()
