"""The resumable chunked writer: chunks of utterances saved as `.npz` under `<store>.partial/`, assembled
into `<store>.tmp`, sealed with checksums and renamed to `<store>` (a store on disk is always complete)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from pipeline import __version__
from pipeline.store.files import StoreError, atomic_write_text, check_free_space, guarded_write, open_for_writing
from pipeline.store.checksums import seal

STR = h5py.string_dtype("utf-8")


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (configs, input ids)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
             attrs: dict[str, Any], extra: dict[str, str] | None = None) -> Path:
    """Write all chunks of `run` into the final HDF5 store, atomically; `extra`: text datasets (notes, not
    per row) written beside `problems`."""
    final = run.final_path
    tmp = final.with_name(final.name + ".tmp")
    size = sum(run._path(i).stat().st_size for i in range(n_chunks) if run.done(i))
    # the chunks' size bounds the store's (its only compression, frames, makes it smaller)
    check_free_space(tmp, size, run.kept + " and assembled again")
    with guarded_write(final, tmp, size, run.kept + " and assembled again"):
        _write_store(tmp, run, utt_ids, n_chunks, layout, attrs, extra or {})
        os.replace(tmp, final)
    run.discard()
    return final


def _write_store(tmp: Path, run: ChunkedRun, utt_ids: list[str], n_chunks: int, layout: StoreLayout,
                 attrs: dict[str, Any], extra: dict[str, str]) -> None:
    final, n = run.final_path, len(utt_ids)
    with open_for_writing(tmp) as f:
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
        for k, text in extra.items():
            f.create_dataset(k, data=text, dtype=STR)
        f.attrs.update({k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                        for k, v in {**attrs, "code_version": __version__, "rows": n}.items() if v is not None})
        seal(f)


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
