"""Reading stores: `H5Store` opens and verifies a store (complete, one row per `utt_id`, attributes of the
kinds ercflow writes, checksums intact); `MediaStore` (decoded audio/frames) and `FeatureStore` (features)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from pipeline.store.files import StoreError, what_to_do
from pipeline.store.checksums import CHECKSUMS, UnsealedStore, content_checksums

_VERIFIED: set[tuple] = set()   # (path, device, inode, size, mtime_ns, ctime_ns) of files verified in this process


def _file_state(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# attribute values ercflow writes: text (JSON for lists and dicts), numbers, booleans, numeric arrays
_ATTR_KINDS = "biufU"


_STORE_ATTRS = ("rows", "fingerprint", "code_version")   # written by `assemble` into every store


class H5Store:
    """Read side shared by media and feature stores: row lookup by utt_id, attributes, ragged rows.

    Opening checks the file is a complete ercflow store: readable HDF5, a `utt_id` dataset and the
    attributes `assemble` writes (of the kinds it writes), one row per `utt_id` in every per-row dataset,
    ragged offsets that fit, and (`verify`) content that matches its recorded checksums."""

    def __init__(self, path: str | Path, verify: bool = True):
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
            self._check_attrs()
            if verify:
                self.verify()
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
            if ds.shape == () and h5py.check_string_dtype(ds.dtype) is not None:   # a note (`assemble`'s extra)
                continue
            want = n + 1 if k.endswith("_offsets") else n
            if not ds.shape or ds.shape[0] != want:
                raise self.error(f"wrong row count: `{k}` has {ds.shape[0] if ds.shape else 0} rows, "
                                 f"`utt_id` {n}{' (+1 offset)' if want > n else ''}")
        for k in ragged:
            if k not in f or int(f[f"{k}_offsets"][-1]) != f[k].shape[0]:
                raise self.error(f"damaged store: ragged `{k}` does not match `{k}_offsets`")

    def _check_attrs(self) -> None:
        """Refuse attribute values ercflow never writes (a compound `np.void`, references, ...): found now,
        not when a bundle's JSON is written after a whole training run."""
        for k, v in self.file.attrs.items():
            kind = np.asarray(v).dtype.kind if not isinstance(v, (str, bytes)) else "U"
            if kind not in _ATTR_KINDS and not (kind == "O" and all(isinstance(x, (str, bytes))
                                                                     for x in np.asarray(v).ravel())):
                raise self.error(f"damaged store: attribute `{k}` holds a {type(v).__name__} "
                                 f"({np.asarray(v).dtype}), not text or numbers as ercflow writes")

    def verify(self) -> None:
        """Check every dataset and the attributes against the `checksums` recorded when the store was written
        (once per process and file state: path, inode, size, mtime and ctime)."""
        state = _file_state(self.path)
        if state in _VERIFIED:
            return
        recorded = self.file.attrs.get(CHECKSUMS)
        if recorded is None:
            raise UnsealedStore(f"{self.path}: no `{CHECKSUMS}` attribute (written by an ercflow before 0.x "
                                f"recorded them), so its content cannot be verified; {what_to_do(self.path)}")
        try:
            recorded = json.loads(recorded)
            if not isinstance(recorded, dict):
                raise ValueError("not a JSON object")
        except (TypeError, ValueError) as e:
            raise self.error(f"damaged store: unreadable `{CHECKSUMS}` attribute ({e})") from e
        now = content_checksums(self.file)
        bad = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
        if bad:
            what = ", ".join("the attributes" if k == "@attrs" else f"`{k}`" for k in bad[:6])
            raise self.error(f"damaged store: the content of {what} does not match the checksum recorded when it "
                             "was written")
        _VERIFIED.add(state)

    def read_error(self, name: str, e: BaseException) -> StoreError:
        """A read of dataset `name` that failed inside an open store (a damaged compressed chunk, ...)."""
        return self.error(f"damaged store: reading `{name}` failed ({type(e).__name__}: {_h5_reason(e)})")

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
        rows = None if utt_ids is None or utt_ids == self.utt_ids else self.rows(utt_ids)
        try:
            data = self.file[name][:]
        except (OSError, ValueError) as e:
            raise self.read_error(name, e) from e
        # the store's own order (a head's usual read): no gather; else per-row arrays are small: read all, index
        return data if rows is None else data[rows]

    def ragged_row(self, name: str, row: int) -> np.ndarray:
        try:
            off = self._offsets.get(name)
            if off is None:   # read once: an h5py read per row of the offsets would cost as much as the row
                off = self._offsets[name] = self.file[f"{name}_offsets"][:]
            return self.file[name][off[row]:off[row + 1]]
        except (OSError, ValueError) as e:
            raise self.read_error(name, e) from e

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
        """The row's samples: float32, finite and within [-1, 1] (decode clips them there), or a `StoreError`."""
        x = self.ragged_row("audio", self._row(utt_id))
        if x.dtype != np.float32 or (x.size and not (np.isfinite(x).all() and np.abs(x).max() <= 1.0)):
            raise self.error(f"damaged store: the audio of {utt_id} is not float32 samples within [-1, 1] "
                             f"({x.dtype}, peak {np.abs(x).max() if x.size else 0:.4g})")
        return x

    def frames(self, utt_id: str) -> np.ndarray:
        """The row's frames [F, S, S, 3] uint8, or a `StoreError`."""
        try:
            x = self.file["frames"][self._row(utt_id)]
        except (OSError, ValueError) as e:
            raise self.read_error("frames", e) from e
        if x.dtype != np.uint8:
            raise self.error(f"damaged store: `frames` are {x.dtype}, not uint8")
        return x


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
            try:
                block = data[base:off[rows[end - 1] + 1]]
            except (OSError, ValueError) as e:
                raise self.read_error("seq", e) from e
            for r in rows[start:end]:
                yield self.utt_ids[r], block[off[r] - base:off[r + 1] - base]
            start = end

    def split(self, manifest, split: str) -> np.ndarray:
        """Pooled features of one split's rows, in manifest order."""
        return self.pooled(manifest.split_rows(split)["utt_id"])

    def by_dialogue(self, manifest, split: str | None = None) -> list[np.ndarray]:
        pooled = self.pooled(manifest.utt_ids)
        return [pooled[idx] for idx in manifest.dialogues(split)]
