"""Content checksums of a store: sha256 per dataset (the stored bytes of a compressed dataset, so no
decompression) and one over the attributes, recorded at write time (`seal`) and verified on open."""
from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np

from pipeline.store.files import StoreError

# -- content checksums ----------------------------------------------------------------------------------
CHECKSUMS = "checksums"     # the attribute: JSON {dataset: digest, "@attrs": digest of the other attributes}


_BLOCK_BYTES = 32 << 20


def _digest() -> "hashlib._Hash":
    return hashlib.sha256()   # about twice blake2b's speed where the CPU has SHA instructions (x86, arm64)


def chunk_offsets(dsid) -> list[tuple]:
    """The offsets of a chunked dataset's stored chunks, in the order of its chunk index. `chunk_iter` walks the
    index once; `get_chunk_info(i)` walks it from the start for every i (quadratic: 16,000 chunks, one per
    frame row of a MELD-size media store, took 7.4 s that way), so it serves only where h5py / HDF5 lack
    chunk_iter. Both give the same order."""
    if hasattr(dsid, "chunk_iter"):
        offsets = []
        try:
            dsid.chunk_iter(lambda info: offsets.append(info.chunk_offset))
            return offsets
        except (NotImplementedError, RuntimeError):   # built against an HDF5 without H5Dchunk_iter
            pass
    return [dsid.get_chunk_info(i).chunk_offset for i in range(dsid.get_num_chunks())]


def dataset_checksum(ds: h5py.Dataset) -> str:
    """sha256 of a dataset's shape, dtype and content: the stored (compressed) bytes of each chunk of a
    filtered dataset, read without decompressing; the values of any other, read in blocks of ~32 MiB."""
    h = _digest()
    h.update(f"{ds.shape}|{ds.dtype}".encode())
    if ds.dtype.kind == "O" or h5py.check_string_dtype(ds.dtype) is not None:   # utt_id, problems
        values = ds[()] if ds.shape == () else ds[:]
        for v in np.atleast_1d(values):
            h.update(v if isinstance(v, bytes) else str(v).encode())
            h.update(b"\0")
    elif ds.chunks is not None and ds.compression is not None:
        dsid = ds.id
        for offset in chunk_offsets(dsid):
            h.update(np.asarray(offset, np.int64).tobytes())
            h.update(dsid.read_direct_chunk(offset)[1])
    elif ds.shape and ds.shape[0]:
        row = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
        step = max(1, _BLOCK_BYTES // row)
        for s in range(0, ds.shape[0], step):
            block = np.ascontiguousarray(ds[s:s + step])
            if block.size:   # a [N, 0] dataset (no audio samples in a text-only store) has no bytes to hash
                h.update(block.reshape(-1).view(np.uint8))
    elif ds.shape == ():
        h.update(np.asarray(ds[()]).tobytes())
    return h.hexdigest()


def _attrs_checksum(f: h5py.File) -> str:
    items = {k: _plain(v) for k, v in f.attrs.items() if k != CHECKSUMS}
    return _digest_text(json.dumps(items, sort_keys=True, default=repr))


def _digest_text(text: str) -> str:
    h = _digest()
    h.update(text.encode())
    return h.hexdigest()


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def content_checksums(f: h5py.File) -> dict[str, str]:
    """The checksum of every top-level dataset of `f` and of its attributes (`checksums` itself aside)."""
    out = {k: dataset_checksum(ds) for k, ds in f.items() if isinstance(ds, h5py.Dataset)}
    out["@attrs"] = _attrs_checksum(f)
    return out


def seal(f: h5py.File) -> None:
    """Record the checksums of `f`'s content in its `checksums` attribute (the last write of a store)."""
    f.flush()
    f.attrs[CHECKSUMS] = json.dumps(content_checksums(f), sort_keys=True)


class UnsealedStore(StoreError):
    """A store without `checksums` (written before ercflow recorded them): it cannot be verified."""
