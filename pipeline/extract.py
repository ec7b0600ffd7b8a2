"""The extraction driver: run one encoder once over a manifest into its feature store, in resumable chunks.

A store that exists with the fingerprint the run would have (the encoder's provenance and its inputs) is left
as it is; an interrupted run resumes from its finished chunks (pipeline/store.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.manifest import Manifest
from pipeline.store import (ChunkedRun, FeatureStore, MediaStore, StoreLayout, assemble, chunk_bounds, fingerprint,
                            run_chunks)

if TYPE_CHECKING:
    from pipeline.encoders import Encoder


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
    interrupted run resumes from its finished chunks."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    media = None
    if encoder.needs_media:
        if media_path is None:
            raise ValueError(f"encoder {encoder.name} needs the media store")
        media = MediaStore(media_path)
    inputs = extract_inputs(manifest, encoder.needs_media, media)
    prov = encoder.provenance()
    run_fp = run_fingerprint(prov, inputs)
    if out_path.exists():
        with FeatureStore(out_path) as old:
            if old.attrs.get("fingerprint") == run_fp:
                return run_summary(len(manifest), 0, old.problems(), skipped="up to date")
    n = len(manifest)
    run = ChunkedRun(out_path, run_fp)
    try:
        computed, problems = run_chunks(run, n, chunk_size,
                                        lambda s, e: encoder.encode(manifest.rows.iloc[s:e], manifest, media), progress)
        first = run.load(0)
        layout = StoreLayout(fixed=["pooled"] + (["logits"] if "logits" in first else []),
                             ragged=["seq"] if "seq" in first else [])
        assemble(run, manifest.utt_ids, len(chunk_bounds(n, chunk_size)), layout,
                 {**prov, "dataset": manifest.meta.dataset, "fingerprint": run_fp, "inputs": inputs,
                  "dim": encoder.dim})
    finally:
        if media is not None:
            media.close()
    return run_summary(n, computed, problems)


def run_summary(n: int, computed: int, problems: list[dict], **extra) -> dict:
    return {"utterances": n, "chunks_computed": computed, "problems": problems,
            "masked": sum(1 for q in problems if q.get("action", "masked") == "masked"), **extra}
