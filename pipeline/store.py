"""HDF5 stores (DESIGN.md, "Media store" and "Feature store") and the resumable chunked writer behind them.

A store is produced in chunks of utterances. Each finished chunk is saved as its own `.npz` (written to a
temp name, then renamed) inside `<store>.partial/`, so killing a run loses at most the chunk in flight and
a re-run with the same fingerprint skips every finished chunk. When all chunks exist they are assembled
into `<store>.tmp`, which is renamed to `<store>`: a store on disk is always complete. Several processes may
fill one `.partial/` folder side by side, each computing its own chunks (pipeline/extract.py under torchrun):
a chunk's content depends only on its bounds, so the store is the same whoever computed each chunk.

Layout of a store (rows follow the manifest's `utt_id` order, stored in the file):
- `utt_id` [N] str; `valid` [N] bool (False: the input was bad and the row is masked, zeros);
- fixed-size arrays [N, ...] (`pooled`, `logits`, `frames`, ...);
- ragged arrays as `<name>` (all rows concatenated on axis 0) + `<name>_offsets` [N + 1];
- `problems`: a JSON list of the per-utterance problems met while building the store;
- attributes: provenance (encoder, weights id and hash, config hash, code version, rates, dtype, ...).

Stores arrive from a DVC remote or a colleague: opening one checks that it is a complete ercflow store whose
datasets all have one row per `utt_id`, and every problem is a `StoreError` naming the file and what to do.
A write that meets a full disk raises `DiskFullError` (one line: the path, the size, what to do) and leaves
no temp file; finished chunks are kept, so a re-run after freeing space resumes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from pipeline import UserError, __version__

STR = h5py.string_dtype("utf-8")


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (configs, input ids)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StoreError(UserError, RuntimeError):
    """A store, checkpoint or model bundle that is missing, damaged, foreign or could not be written.

    The message is one line naming the file, what is wrong and what to do."""


class DiskFullError(StoreError):
    """A write failed for lack of disk space (ENOSPC) or quota (EDQUOT)."""


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = tuple(os.strerror(n) for n in _DISK_FULL) + tuple(f"os error {n})" for n in _DISK_FULL)


def is_disk_full(e: BaseException | None) -> bool:
    """True for an OSError with errno ENOSPC/EDQUOT, or an error (safetensors', h5py's) whose message or
    cause says so."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if any(t in str(e) for t in _DISK_FULL_TEXT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def remove_path(path: Path) -> None:
    """Remove a temp file or directory (a symlink itself, never its target); absent is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def guarded_write(path: str | Path, tmp: str | Path | None = None, nbytes: int | None = None,
                  then: str = "re-run the stage"):
    """Around a write of `path` (through `tmp`): on any failure remove `tmp`; a full disk becomes one
    `DiskFullError` naming `path`, the size being written and what to do."""
    try:
        yield
    except BaseException as e:
        if tmp is not None:
            remove_path(Path(tmp))
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e):
            code = e.errno if isinstance(e, OSError) and e.errno in _DISK_FULL else errno.ENOSPC
            size = f" {'about ' if nbytes and nbytes > 4096 else ''}{_size(nbytes)}" if nbytes else ""
            where = Path(path).resolve().parent
            raise DiskFullError(f"{path}: disk full ({os.strerror(code)}) while writing{size}; free space on "
                                f"the disk holding {where} (`df -h {where}`), then {then}") from e
        raise


def what_to_do(path: str | Path, delete: str | Path | None = None) -> str:
    """How to get a good copy of a file the pipeline writes: the DVC output to pull, or what to delete (a
    `persist` output is not deleted by DVC before its stage runs) and the stage to re-run."""
    parts = Path(path).parts
    out, stage = Path(path), None
    for i in range(len(parts) - 2, -1, -1):   # data/features/<D>/<E>.h5, data/media/<D>.h5, models/<D>/...
        rest = parts[i + 1:]
        if parts[i] == "features" and len(rest) == 2 and rest[1].endswith(".h5"):
            d, e = rest[0], Path(rest[1]).stem   # a teacher store has its checkpoints in models/<D>/<E>/
            teacher = Path(*parts[:max(i - 1, 0)], "models", d, e).is_dir()
            stage = f"{'finetune_text' if teacher else 'extract'}@{d}-{e}"
        elif parts[i] == "media" and len(rest) == 1 and rest[0].endswith(".h5"):
            stage = f"decode@{Path(rest[0]).stem}"
        elif parts[i] == "models" and len(rest) == 2 and rest[1].endswith(".safetensors"):
            stage = f"train@{rest[0]}-{Path(rest[1]).stem}"
        elif parts[i] == "models" and len(rest) >= 2:   # a fine-tune checkpoint: the DVC output is its dir
            out, stage = Path(*parts[:i + 3]), f"finetune_text@{rest[0]}-{rest[1]}"
        if stage:
            break
    rerun = f"`dvc repro {stage}`" if stage else "the stage that writes it"
    return f"re-pull it with `dvc pull {out}`, or delete {delete or path} and re-run {rerun}"


def atomic_write_text(path: str | Path, text: str, *, then: str = "re-run the stage") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = text.encode()
    with guarded_write(path, tmp, len(data), then):
        tmp.write_text(text)
        os.replace(tmp, path)


class ChunkedRun:
    """Finished chunks of one store under construction, kept across interrupted runs."""

    def __init__(self, final_path: str | Path, run_fingerprint: str):
        self.final_path = Path(final_path)
        self.dir = self.final_path.with_name(self.final_path.name + ".partial")
        meta = self.dir / "fingerprint"
        self.kept = f"re-run: finished chunks in {self.dir} are kept"
        if meta.exists() and meta.read_text() == run_fingerprint:
            return   # this run's folder (perhaps made by another rank of it): left as it is
        if self.dir.exists():
            shutil.rmtree(self.dir)  # chunks of another config are of no use
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta, run_fingerprint, then=self.kept)

    def _path(self, i: int) -> Path:
        return self.dir / f"chunk_{i:06d}.npz"

    def path(self, i: int) -> Path:
        """Chunk i's file: it exists once the chunk is finished."""
        return self._path(i)

    def done(self, i: int) -> bool:
        return self._path(i).exists()

    def save(self, i: int, arrays: dict[str, np.ndarray], notes: list | None = None) -> None:
        """Save chunk i; `notes` (JSON-able, e.g. per-utterance problems) are kept beside it."""
        atomic_write_text(self.dir / f"chunk_{i:06d}.notes.json", json.dumps(notes or []), then=self.kept)
        tmp = self.dir / f".chunk_{i:06d}.tmp.npz"
        with guarded_write(self._path(i), tmp, sum(int(np.asarray(a).nbytes) for a in arrays.values()), self.kept):
            np.savez(tmp, **arrays)
            os.replace(tmp, self._path(i))  # the npz appears last: its presence means the chunk is done

    def notes(self, i: int) -> list:
        return json.loads((self.dir / f"chunk_{i:06d}.notes.json").read_text())

    def load(self, i: int) -> dict[str, np.ndarray]:
        try:
            with np.load(self._path(i), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise StoreError(f"{self._path(i)}: damaged chunk ({type(e).__name__}: {e}); delete it and re-run "
                             "the stage (the other finished chunks are kept)") from e

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class StoreLayout:
    """Which chunk arrays are fixed-size per row and which are ragged; how to compress."""
    fixed: list[str]
    ragged: list[str] = field(default_factory=list)
    compress: list[str] = field(default_factory=list)   # gzip these (frames), row-chunked


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)] or [(0, 0)]


def assemble(run: ChunkedRun, utt_ids: list[str], n_chunks: int, layout: StoreLayout,
             attrs: dict[str, Any]) -> Path:
    """Write all chunks of `run` into the final HDF5 store, atomically."""
    final = run.final_path
    tmp = final.with_name(final.name + ".tmp")
    size = sum(run._path(i).stat().st_size for i in range(n_chunks) if run.done(i))
    with guarded_write(final, tmp, size, run.kept + " and assembled again"):
        _write_store(tmp, run, utt_ids, n_chunks, layout, attrs)
        os.replace(tmp, final)
    run.discard()
    return final


def _write_store(tmp: Path, run: ChunkedRun, utt_ids: list[str], n_chunks: int, layout: StoreLayout,
                 attrs: dict[str, Any]) -> None:
    final, n = run.final_path, len(utt_ids)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("utt_id", data=np.array(utt_ids, dtype=object), dtype=STR)
        row = 0
        ragged_len = {k: 0 for k in layout.ragged}
        for i in range(n_chunks):
            chunk = run.load(i)
            m = len(chunk["valid"])
            if i == 0:
                for k in layout.fixed + ["valid"]:
                    a = chunk[k]
                    opts = dict(compression="gzip", compression_opts=4, chunks=(1,) + a.shape[1:]) \
                        if k in layout.compress else {}
                    f.create_dataset(k, shape=(n,) + a.shape[1:], dtype=a.dtype, **opts)
                for k in layout.ragged:
                    a = chunk[k]
                    # HDF5 chunks of ~512 KiB (h5py's own guess is ~10x smaller for [T, 384] float32 rows): whole
                    # chunks fit the default 1 MiB chunk cache, and a block read touches few of them
                    row_bytes = max(1, int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize)
                    f.create_dataset(k, shape=(0,) + a.shape[1:], maxshape=(None,) + a.shape[1:], dtype=a.dtype,
                                     chunks=(max(1, (512 << 10) // row_bytes),) + a.shape[1:])
                    f.create_dataset(f"{k}_offsets", shape=(n + 1,), dtype=np.int64)
            for k in layout.fixed + ["valid"]:
                f[k][row:row + m] = chunk[k]
            for k in layout.ragged:
                lengths = chunk[f"{k}_lengths"]
                ds = f[k]
                start = ragged_len[k]
                ds.resize(start + int(lengths.sum()), axis=0)
                ds[start:] = chunk[k]
                f[f"{k}_offsets"][row + 1:row + m + 1] = start + np.cumsum(lengths)
                ragged_len[k] = start + int(lengths.sum())
            row += m
        if row != n:
            raise StoreError(f"{final}: the chunks in {run.dir} hold {row} rows, the manifest {n}; delete "
                             f"{run.dir} and re-run the stage")
        # the per-utterance problems travel with the store, so a later no-op run can still report them
        f.create_dataset("problems", data=json.dumps([q for i in range(n_chunks) for q in run.notes(i)]), dtype=STR)
        f.attrs.update({k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                        for k, v in {**attrs, "code_version": __version__, "rows": n}.items() if v is not None})


def run_chunks(run: ChunkedRun, n: int, chunk_size: int, compute, progress=None,
               chunks: Iterable[int] | None = None) -> tuple[int, list]:
    """Call `compute(start, end) -> (arrays, notes)` for each chunk not yet done (of `chunks`, the indices
    this process computes; None: all).

    Returns how many chunks were computed now and the notes of those chunks, finished earlier or now."""
    computed, notes = 0, []
    bounds = chunk_bounds(n, chunk_size)
    for i in (range(len(bounds)) if chunks is None else chunks):
        s, e = bounds[i]
        if not run.done(i):
            run.save(i, *compute(s, e))
            computed += 1
        notes.extend(run.notes(i))
        if progress is not None:
            progress.update(e - s)
    return computed, notes


def ragged(arrays: Iterable[np.ndarray], name: str, dtype, tail_shape=()) -> dict[str, np.ndarray]:
    """Pack per-row arrays as one concatenated array plus lengths (chunk form of a ragged dataset)."""
    arrays = list(arrays)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    data = np.concatenate(arrays).astype(dtype) if arrays and lengths.sum() else np.zeros((0,) + tuple(tail_shape), dtype)
    return {name: data, f"{name}_lengths": lengths}


_STORE_ATTRS = ("rows", "fingerprint", "code_version")   # written by `assemble` into every store


class H5Store:
    """Read side shared by media and feature stores: row lookup by utt_id, attributes, ragged rows.

    Opening checks the file is a complete ercflow store: readable HDF5, a `utt_id` dataset and the
    attributes `assemble` writes, one row per `utt_id` in every per-row dataset, ragged offsets that fit."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offsets: dict[str, np.ndarray] = {}
        if not self.path.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = " (an interrupted run left chunks; re-run the stage to resume)" if partial.exists() else ""
            raise StoreError(f"store not found: {self.path}{hint}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise self.error(f"not a readable HDF5 file: {_h5_reason(e)}") from e
        try:
            self._check_layout()
            self.utt_ids = [s.decode() if isinstance(s, bytes) else s for s in self.file["utt_id"][:]]
            if len(set(self.utt_ids)) != len(self.utt_ids):
                raise self.error("damaged store: `utt_id` holds duplicates")
        except StoreError:
            self.file.close()
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:   # a damaged dataset inside an openable file
            self.file.close()
            raise self.error(f"damaged store ({type(e).__name__}: {_h5_reason(e)})") from e
        self.row_of = {u: i for i, u in enumerate(self.utt_ids)}

    def error(self, what: str) -> StoreError:
        return StoreError(f"{self.path}: {what}; {what_to_do(self.path)}")

    def _check_layout(self) -> None:
        f = self.file
        missing = [a for a in _STORE_ATTRS if a not in f.attrs]
        if "utt_id" not in f or missing:
            what = "no `utt_id` dataset" if "utt_id" not in f else f"no attribute(s) {missing}"
            raise self.error(f"not an ercflow store ({what}; datasets: {sorted(f)[:8]})")
        n = f["utt_id"].shape[0] if f["utt_id"].shape else -1
        if int(f.attrs["rows"]) != n:
            raise self.error(f"wrong row count: `utt_id` has {n} rows, the store says {int(f.attrs['rows'])}")
        ragged = {k[:-len("_offsets")] for k in f if k.endswith("_offsets")}
        for k, ds in f.items():
            if not isinstance(ds, h5py.Dataset) or k in ragged or k in ("utt_id", "problems"):
                continue
            want = n + 1 if k.endswith("_offsets") else n
            if not ds.shape or ds.shape[0] != want:
                raise self.error(f"wrong row count: `{k}` has {ds.shape[0] if ds.shape else 0} rows, "
                                 f"`utt_id` {n}{' (+1 offset)' if want > n else ''}")
        for k in ragged:
            if k not in f or int(f[f"{k}_offsets"][-1]) != f[k].shape[0]:
                raise self.error(f"damaged store: ragged `{k}` does not match `{k}_offsets`")

    def require(self, utt_ids: Iterable[str]) -> None:
        """Refuse a store that does not hold every one of `utt_ids` (built from another manifest)."""
        self.rows(utt_ids)

    def _row(self, utt_id: str) -> int:
        if utt_id not in self.row_of:
            self.rows([utt_id])
        return self.row_of[utt_id]

    @property
    def attrs(self) -> dict[str, Any]:
        out = {}
        for k, v in self.file.attrs.items():
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            out[k] = v.item() if isinstance(v, np.generic) else v
        return out

    def rows(self, utt_ids: Iterable[str]) -> np.ndarray:
        utt_ids = list(utt_ids)
        missing = [u for u in utt_ids if u not in self.row_of]
        if missing:
            raise self.error(f"{len(missing)} of the manifest's utterance(s) not in the store ({len(self.utt_ids)} "
                             f"rows), e.g. {missing[:5]}: it was built from another manifest")
        return np.array([self.row_of[u] for u in utt_ids], dtype=np.int64)

    def fixed(self, name: str, utt_ids: Iterable[str] | None = None) -> np.ndarray:
        if utt_ids is not None:
            utt_ids = list(utt_ids)
        if utt_ids is None or utt_ids == self.utt_ids:   # the store's own order (a head's usual read): no gather
            return self.file[name][:]
        return self.file[name][:][self.rows(utt_ids)]  # per-row arrays here are small: read all, index

    def ragged_row(self, name: str, row: int) -> np.ndarray:
        off = self._offsets.get(name)
        if off is None:   # read once: an h5py read per row of the offsets would cost as much as the row
            off = self._offsets[name] = self.file[f"{name}_offsets"][:]
        return self.file[name][off[row]:off[row + 1]]

    def problems(self) -> list[dict]:
        """The per-utterance problems recorded when the store was built (masked/trimmed inputs)."""
        return json.loads(self.file["problems"][()]) if "problems" in self.file else []

    def has(self, name: str) -> bool:
        return name in self.file

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _h5_reason(e: BaseException) -> str:
    """h5py's message, cut to its first line and without the C-level detail."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "truncated file" in text:
        sizes = dict(re.findall(r"\b(eof|stored_eof) = (\d+)", text))
        return (f"truncated ({sizes['eof']} of {sizes['stored_eof']} bytes)" if len(sizes) == 2 else "truncated")
    if "file signature not found" in text:
        return "not an HDF5 file (file signature not found)"
    return text


class MediaStore(H5Store):
    """Decoded media: `audio` ragged float32 at `sample_rate`, `frames` [N, F, S, S, 3] uint8,
    `audio_valid` / `video_valid` [N] bool."""

    def audio(self, utt_id: str) -> np.ndarray:
        return self.ragged_row("audio", self._row(utt_id))

    def frames(self, utt_id: str) -> np.ndarray:
        return self.file["frames"][self._row(utt_id)]


class FeatureStore(H5Store):
    """Encoder output: `pooled` [N, D], optional `seq` (ragged [T, D]) and `logits` [N, C], `valid` [N].

    A store that kept several hidden layers of its encoder (`layers: all | [i, ...]`,
    pipeline/encoders/layers.py) has `pooled` [N, L, D] and `seq` [T, L, D], and its `layers` attribute lists
    the L `hidden_states` indices in order; `dim` is D either way."""

    @property
    def dim(self) -> int:
        return int(self.file["pooled"].shape[-1])

    @property
    def layers(self) -> list[int] | None:
        """The hidden-state indices of the L layers of a [N, L, D] store; None for a [N, D] one."""
        shape = self.file["pooled"].shape
        if len(shape) != 3:
            return None
        layers = self.attrs.get("layers")
        if not isinstance(layers, list) or len(layers) != shape[1]:
            raise self.error(f"damaged store: `pooled` holds {shape[1]} layers, its `layers` attribute says {layers!r}")
        return [int(i) for i in layers]

    def pooled(self, utt_ids: Iterable[str] | None = None) -> np.ndarray:
        return self.fixed("pooled", utt_ids)

    def valid(self, utt_ids: Iterable[str] | None = None) -> np.ndarray:
        return self.fixed("valid", utt_ids)

    def logits(self, utt_ids: Iterable[str] | None = None) -> np.ndarray | None:
        return self.fixed("logits", utt_ids) if self.has("logits") else None

    def sequence(self, utt_id: str) -> np.ndarray:
        return self.ragged_row("seq", self._row(utt_id))

    def sequences(self, utt_ids: Iterable[str] | None = None, block_bytes: int = 64 << 20):
        """(utt_id, seq) of each utterance (all: None), in the store's row order, read in contiguous blocks of
        about `block_bytes` (one h5py read per block: per-row reads cost ~5x more per byte, bench/scale.py)."""
        rows = np.arange(len(self.utt_ids)) if utt_ids is None else np.sort(self.rows(utt_ids))
        if not len(rows):
            return
        self.ragged_row("seq", int(rows[0]))   # loads the offsets
        off, data = self._offsets["seq"], self.file["seq"]
        row_bytes = int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize
        start = 0
        while start < len(rows):
            end = start + 1   # grow the block while the next row is adjacent and the block is small enough
            while (end < len(rows) and rows[end] == rows[end - 1] + 1
                   and (off[rows[end] + 1] - off[rows[start]]) * row_bytes <= block_bytes):
                end += 1
            base = off[rows[start]]
            block = data[base:off[rows[end - 1] + 1]]
            for r in rows[start:end]:
                yield self.utt_ids[r], block[off[r] - base:off[r + 1] - base]
            start = end

    def split(self, manifest, split: str) -> np.ndarray:
        """Pooled features of one split's rows, in manifest order."""
        return self.pooled(manifest.split_rows(split)["utt_id"])

    def by_dialogue(self, manifest, split: str | None = None) -> list[np.ndarray]:
        pooled = self.pooled(manifest.utt_ids)
        return [pooled[idx] for idx in manifest.dialogues(split)]
