"""The extraction driver: run one encoder once over a manifest into its feature store, in resumable chunks.

A store that exists with the fingerprint the run would have (the encoder's provenance and its inputs) is left
as it is; an interrupted run resumes from its finished chunks (pipeline/store/).

Under torchrun (pipeline/distributed.py) every rank runs `extract` with the same arguments: rank 0 decides
whether the store is up to date, prepares `<store>.partial/` and lists the chunks still to compute; each rank
computes its slice of that list (rank r: items r, r + N, ... of it); rank 0 then waits for the others' chunk
files and assembles the store. A chunk's content depends only on its bounds, so the store is the one a single
process writes (tested byte for byte), and a run killed part-way loses only the chunks in flight.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import distributed
from pipeline.manifest import Manifest
from pipeline.store import (ChunkedRun, FeatureStore, MediaStore, StoreLayout, UnsealedStore, assemble, chunk_bounds,
                            fingerprint, run_chunks, writer_lock)

if TYPE_CHECKING:
    from pipeline.encoders import Encoder

log = logging.getLogger(__name__)

TEXT_INPUT_COLUMNS = ["utt_id", "dialogue_id", "turn", "speaker", "text"]   # what a text encoder reads


def extract_inputs(manifest: Manifest, needs_media: bool, media: MediaStore | None) -> str:
    """The fingerprint of what an encoder reads: the media store's, or the manifest's text columns."""
    if needs_media:
        return media.attrs["fingerprint"]
    return fingerprint(manifest.rows[TEXT_INPUT_COLUMNS].to_dict("list"))


def run_fingerprint(provenance: dict, inputs: str) -> str:
    """The fingerprint a feature store carries: what computed it and from what."""
    return fingerprint({"provenance": provenance, "inputs": inputs})


def extract(manifest: Manifest, encoder: Encoder, out_path: str | Path, media_path: str | Path | None = None,
            chunk_size: int = 256, progress=None) -> dict:
    """Run `encoder` over every manifest row into the feature store at `out_path`.

    A store that exists with the same fingerprint (encoder config, weights, inputs) is left as it is; an
    interrupted run resumes from its finished chunks. Under torchrun the ranks share the chunks (module
    docstring); rank 0 returns the run's summary, the others a summary of their share."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    r = distributed.ranks()
    lock = contextlib.ExitStack()
    if r.main:   # one writer per store: a second extract waits for the first (the other ranks share its run)
        lock.enter_context(writer_lock(out_path))
    media = None
    if encoder.needs_media:
        if media_path is None:
            raise ValueError(f"encoder {encoder.name} needs the media store")
        try:
            media = MediaStore(media_path)
        except BaseException:
            lock.close()
            raise
    try:
        inputs = extract_inputs(manifest, encoder.needs_media, media)
        prov = {**encoder.provenance(), **encoder.manifest_provenance(manifest)}
        run_fp = run_fingerprint(prov, inputs)
        n = len(manifest)
        bounds = chunk_bounds(n, chunk_size)
        distributed.join_group(r)
        distributed.barrier(r, f"starting {out_path}")   # names a rank that never comes
        # rank 0 decides (up to date?), prepares the .partial folder and lists what is left; then the others
        run, plan = None, {"up_to_date": None, "pending": []}
        if r.main:
            plan["up_to_date"] = _up_to_date(out_path, run_fp)
            if plan["up_to_date"] is None:
                run = ChunkedRun(out_path, run_fp)
                plan["pending"] = [i for i in range(len(bounds)) if not run.done(i)]
        plan = distributed.broadcast(r, plan, f"the plan of {out_path}")
        if plan["up_to_date"] is not None:
            return run_summary(n, 0, plan["up_to_date"], skipped="up to date")
        if run is None:
            run = ChunkedRun(out_path, run_fp)   # rank 0 made it: opened as it is
        pending = plan["pending"]
        mine = r.share(pending) if r.distributed else None
        if progress is not None and r.distributed:
            if r.main:   # rank 0's bar counts every rank's chunks (the others' while it waits for them)
                left = set(pending)
                progress.update(sum(e - s for i, (s, e) in enumerate(bounds) if i not in left))
            else:
                progress.reset(total=sum(bounds[i][1] - bounds[i][0] for i in mine))

        def compute(s, e):
            return encoder.encode(manifest.rows.iloc[s:e], manifest, media)

        computed, _ = run_chunks(run, n, chunk_size, compute, progress, chunks=mine)
        if not r.main:
            return run_summary(sum(bounds[i][1] - bounds[i][0] for i in mine), computed, [], rank=r.rank)
        if r.distributed:
            others = {run.path(i): k % r.world for k, i in enumerate(pending) if k % r.world != r.rank}
            log.info(f"{out_path}: {r}: waiting for {len(others)} chunk(s) of the other ranks")
            distributed.wait_for_files(r, others, f"assembling {out_path}", progress=progress,
                                       sizes={run.path(i): bounds[i][1] - bounds[i][0] for i in pending})
            computed = len(pending)
        problems = [q for i in range(len(bounds)) for q in run.notes(i)]
        first = run.load(0)
        layout = StoreLayout(fixed=["pooled"] + (["logits"] if "logits" in first else []),
                             ragged=["seq"] if "seq" in first else [])
        assemble(run, manifest.utt_ids, len(bounds), layout,
                 {**prov, "dataset": manifest.meta.dataset, "fingerprint": run_fp, "inputs": inputs,
                  "dim": encoder.dim})
    finally:
        if media is not None:
            media.close()
        lock.close()
    extra = {"procs": r.world} if r.distributed else {}
    return run_summary(n, computed, problems, **extra)


def _up_to_date(out_path: Path, run_fp: str) -> list[dict] | None:
    """The recorded problems of the store at `out_path` when it has fingerprint `run_fp`, else None."""
    if not out_path.exists():
        return None
    try:   # opening verifies the content against its checksums: a damaged store is an error, never up to date
        with FeatureStore(out_path) as old:
            return old.problems() if old.attrs.get("fingerprint") == run_fp else None
    except UnsealedStore:   # written before stores recorded checksums: computed again
        return None


def run_summary(n: int, computed: int, problems: list[dict], **extra) -> dict:
    return {"utterances": n, "chunks_computed": computed, "problems": problems,
            "masked": sum(1 for q in problems if q.get("action", "masked") == "masked"), **extra}
