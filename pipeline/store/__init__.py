"""HDF5 stores (docs/design.md, "Media store" and "Feature store") and the resumable chunked writer behind them.

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
datasets all have one row per `utt_id`, that its attributes are of the kinds ercflow writes, and that every
dataset and the attributes still hash to the checksums recorded when it was written (`checksums`, sha256 per
dataset: the stored bytes of a compressed dataset, so no decompression; verified once per process and file
state). Every problem is a `StoreError` naming the file and what to do (`dvc pull`, or delete and re-run).
A write that meets a full disk raises `DiskFullError` (one line: the path, the size, what to do) and leaves
no temp file, also when the disk fills while HDF5 closes the file; finished chunks are kept, so a re-run
after freeing space resumes. One process writes a store at a time (`writer_lock`): a second one waits for
the first, naming it.

Files: files.py (errors, safe writes), lock.py (one writer), checksums.py, writer.py (the chunked
writer), readers.py (H5Store, MediaStore, FeatureStore).
"""
# the package's face: callers import from pipeline.store
from pipeline.store.checksums import CHECKSUMS, UnsealedStore, content_checksums, dataset_checksum, seal  # noqa: F401
from pipeline.store.files import (DiskFullError, StoreError, atomic_write_text, check_free_space,  # noqa: F401
                                  guarded_write, is_disk_full, open_for_writing, remove_path, what_to_do)
from pipeline.store.lock import StoreBusy, writer_lock  # noqa: F401
from pipeline.store.readers import FeatureStore, H5Store, MediaStore  # noqa: F401
from pipeline.store.writer import (STR, ChunkedRun, StoreLayout, assemble, chunk_bounds, fingerprint,  # noqa: F401
                                   ragged, run_chunks)
