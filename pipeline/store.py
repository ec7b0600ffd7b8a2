"""HDF5 stores (DESIGN.md, "Media store" and "Feature store") and the resumable chunked writer behind them.

A store is produced in chunks of utterances. Each finished chunk is saved as its own `.npz` (written to a
temp name, then renamed) inside `<store>.partial/`, so killing a run loses at most the chunk in flight and
a re-run with the same fingerprint skips every finished chunk. When all chunks exist they are assembled
into `<store>.tmp`, which is renamed to `<store>`: a store on disk is always complete.

Layout of a store (rows follow the manifest's `utt_id` order, stored in the file):
- `utt_id` [N] str; `valid` [N] bool (False: the input was bad and the row is masked, zeros);
- fixed-size arrays [N, ...] (`pooled`, `logits`, `frames`, ...);
- ragged arrays as `<name>` (all rows concatenated on axis 0) + `<name>_offsets` [N + 1];
- `problems`: a JSON list of the per-utterance problems met while building the store;
- attributes: provenance (encoder, weights id and hash, config hash, code version, rates, dtype, ...).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from pipeline import __version__

STR = h5py.string_dtype("utf-8")


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (configs, input ids)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ChunkedRun:
    """Finished chunks of one store under construction, kept across interrupted runs."""

    def __init__(self, final_path: str | Path, run_fingerprint: str):
        self.final_path = Path(final_path)
        self.dir = self.final_path.with_name(self.final_path.name + ".partial")
        meta = self.dir / "fingerprint"
        if self.dir.exists() and (not meta.exists() or meta.read_text() != run_fingerprint):
            shutil.rmtree(self.dir)  # chunks of another config are of no use
        self.dir.mkdir(parents=True, exist_ok=True)
        meta.write_text(run_fingerprint)

    def _path(self, i: int) -> Path:
        return self.dir / f"chunk_{i:06d}.npz"

    def done(self, i: int) -> bool:
        return self._path(i).exists()

    def save(self, i: int, arrays: dict[str, np.ndarray], notes: list | None = None) -> None:
        """Save chunk i; `notes` (JSON-able, e.g. per-utterance problems) are kept beside it."""
        atomic_write_text(self.dir / f"chunk_{i:06d}.notes.json", json.dumps(notes or []))
        tmp = self.dir / f".chunk_{i:06d}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self._path(i))  # the npz appears last: its presence means the chunk is done

    def notes(self, i: int) -> list:
        return json.loads((self.dir / f"chunk_{i:06d}.notes.json").read_text())

    def load(self, i: int) -> dict[str, np.ndarray]:
        with np.load(self._path(i), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

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
    n = len(utt_ids)
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
                    f.create_dataset(k, shape=(0,) + a.shape[1:], maxshape=(None,) + a.shape[1:], dtype=a.dtype,
                                     chunks=True)
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
            raise RuntimeError(f"{final}: chunks hold {row} rows, the manifest {n}")
        # the per-utterance problems travel with the store, so a later no-op run can still report them
        f.create_dataset("problems", data=json.dumps([q for i in range(n_chunks) for q in run.notes(i)]), dtype=STR)
        f.attrs.update({k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                        for k, v in {**attrs, "code_version": __version__, "rows": n}.items() if v is not None})
    os.replace(tmp, final)
    run.discard()
    return final


def run_chunks(run: ChunkedRun, n: int, chunk_size: int, compute, progress=None) -> tuple[int, list]:
    """Call `compute(start, end) -> (arrays, notes)` for each chunk not yet done.

    Returns how many chunks were computed now and the notes of all chunks, finished earlier or now."""
    computed, notes = 0, []
    for i, (s, e) in enumerate(chunk_bounds(n, chunk_size)):
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


class StoreError(RuntimeError):
    pass


class H5Store:
    """Read side shared by media and feature stores: row lookup by utt_id, attributes, ragged rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = " (an interrupted run left chunks; re-run the stage to resume)" if partial.exists() else ""
            raise StoreError(f"store not found: {self.path}{hint}")
        self.file = h5py.File(self.path, "r")
        self.utt_ids = [s.decode() if isinstance(s, bytes) else s for s in self.file["utt_id"][:]]
        self.row_of = {u: i for i, u in enumerate(self.utt_ids)}

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
            raise StoreError(f"{self.path}: {len(missing)} utterance(s) not in the store, e.g. {missing[:5]}; "
                             "was it built from another manifest?")
        return np.array([self.row_of[u] for u in utt_ids], dtype=np.int64)

    def fixed(self, name: str, utt_ids: Iterable[str] | None = None) -> np.ndarray:
        if utt_ids is None:
            return self.file[name][:]
        return self.file[name][:][self.rows(utt_ids)]  # per-row arrays here are small: read all, index

    def ragged_row(self, name: str, row: int) -> np.ndarray:
        off = self.file[f"{name}_offsets"]
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


class MediaStore(H5Store):
    """Decoded media: `audio` ragged float32 at `sample_rate`, `frames` [N, F, S, S, 3] uint8,
    `audio_valid` / `video_valid` [N] bool."""

    def audio(self, utt_id: str) -> np.ndarray:
        return self.ragged_row("audio", self.row_of[utt_id])

    def frames(self, utt_id: str) -> np.ndarray:
        return self.file["frames"][self.row_of[utt_id]]


class FeatureStore(H5Store):
    """Encoder output: `pooled` [N, D], optional `seq` (ragged [T, D]) and `logits` [N, C], `valid` [N]."""

    @property
    def dim(self) -> int:
        return int(self.file["pooled"].shape[1])

    def pooled(self, utt_ids: Iterable[str] | None = None) -> np.ndarray:
        return self.fixed("pooled", utt_ids)

    def valid(self, utt_ids: Iterable[str] | None = None) -> np.ndarray:
        return self.fixed("valid", utt_ids)

    def logits(self, utt_ids: Iterable[str] | None = None) -> np.ndarray | None:
        return self.fixed("logits", utt_ids) if self.has("logits") else None

    def sequence(self, utt_id: str) -> np.ndarray:
        return self.ragged_row("seq", self.row_of[utt_id])

    def split(self, manifest, split: str) -> np.ndarray:
        """Pooled features of one split's rows, in manifest order."""
        return self.pooled(manifest.split_rows(split)["utt_id"])

    def by_dialogue(self, manifest, split: str | None = None) -> list[np.ndarray]:
        pooled = self.pooled(manifest.utt_ids)
        return [pooled[idx] for idx in manifest.dialogues(split)]
