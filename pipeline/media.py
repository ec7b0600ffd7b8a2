"""Decoding media once into the media store: 16 kHz mono audio and a canonical frame sampling.

decord reads both (audio resampled and down-mixed by ffmpeg inside it, so the rate written to the store is
the true rate of the samples). Frames are decoded at their native size and resized with torch's antialiased
bilinear interpolation: decord's own scaler fails on some small target sizes. A clip is cut by the manifest's
start/end only when its file is shared by several utterances (a dialogue-level wav or avi, as in IEMOCAP);
a per-utterance file is read whole.

Bad input is a `Problem` naming the utterance and file: missing or unreadable files, a video without an
audio track, empty or non-finite audio, clips longer than `max_clip_seconds`. Per `decode.on_bad_media`,
decoding stops with a `MediaError` (fail) or the utterance's modality is masked (mask): zeros in the
store, `audio_valid` / `video_valid` False, and the problem listed in the stage's summary.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.datasets import Problem
from pipeline.manifest import Manifest
from pipeline.params import DecodeParams
from pipeline.store import ChunkedRun, StoreLayout, assemble, chunk_bounds, fingerprint, ragged, run_chunks


class MediaError(RuntimeError):
    pass


def _decord():
    import decord

    decord.bridge.set_bridge("native")
    decord.logging.set_level(decord.logging.QUIET)
    return decord


def frame_indices(first: int, last: int, count: int) -> np.ndarray:
    """`count` frame indices spread uniformly over [first, last] (repeating when the clip is short)."""
    return np.linspace(first, max(first, last), count).round().astype(np.int64)


class ClipDecoder:
    """Decodes one utterance's audio and frames; keeps the last video open (rows come dialogue by dialogue)."""

    def __init__(self, root: Path, p: DecodeParams):
        self.root, self.p = root, p
        self._video_path, self._video = None, None
        self.trimmed: list[str] = []   # notes on clips cut to max_clip_seconds (long_clip: trim)

    def audio(self, rel: str, span: tuple[float, float] | None) -> tuple[np.ndarray, str | None]:
        decord = _decord()
        path = self.root / rel
        if not path.exists():
            return np.zeros(0, np.float32), "audio file missing"
        try:
            reader = decord.AudioReader(str(path), ctx=decord.cpu(0), sample_rate=self.p.sample_rate, mono=True)
            x = reader[:].asnumpy().reshape(-1).astype(np.float32)
        except Exception as e:  # decord raises DECORDError/RuntimeError with ffmpeg's reason
            reason = "no audio track" if "audio stream" in str(e) else f"unreadable audio ({_first_line(e)})"
            return np.zeros(0, np.float32), reason
        if span is not None:
            x = x[int(span[0] * self.p.sample_rate):int(span[1] * self.p.sample_rate)]
        if x.size == 0:
            return x, "empty audio"
        if not np.isfinite(x).all():
            return np.zeros(0, np.float32), "non-finite audio samples"
        limit = int(self.p.max_clip_seconds * self.p.sample_rate)
        if x.size > limit:
            seconds = x.size / self.p.sample_rate
            if self.p.long_clip == "mask":
                return np.zeros(0, np.float32), f"audio runs {seconds:.1f} s > max_clip_seconds"
            self.trimmed.append(f"audio trimmed from {seconds:.1f} s to max_clip_seconds")
            x = x[:limit]
        return x, None

    def frames(self, rel: str, span: tuple[float, float] | None) -> tuple[np.ndarray, str | None]:
        decord = _decord()
        blank = np.zeros((self.p.frames, self.p.size, self.p.size, 3), np.uint8)
        path = self.root / rel
        if not path.exists():
            return blank, "video file missing"
        try:
            if self._video_path != path:
                self._video, self._video_path = None, None
                self._video = decord.VideoReader(str(path), ctx=decord.cpu(0))
                self._video_path = path
            vr = self._video
            n, fps = len(vr), float(vr.get_avg_fps() or 25.0)
            first, last = 0, n - 1
            if span is not None:
                first, last = min(n - 1, int(span[0] * fps)), min(n - 1, int(span[1] * fps))
            if n == 0 or last < first:
                return blank, "no video frames"
            seconds = (last - first + 1) / fps
            if seconds > self.p.max_clip_seconds:
                if self.p.long_clip == "mask":
                    return blank, f"video runs {seconds:.1f} s > max_clip_seconds"
                self.trimmed.append(f"video trimmed from {seconds:.1f} s to max_clip_seconds")
                last = first + int(self.p.max_clip_seconds * fps) - 1
            frames = vr.get_batch(frame_indices(first, last, self.p.frames).tolist()).asnumpy()
            return resize_frames(frames, self.p.size), None
        except Exception as e:
            return blank, f"unreadable video ({_first_line(e)})"


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """[F, H, W, 3] uint8 -> [F, size, size, 3] uint8."""
    import torch
    from torch.nn import functional as F

    if frames.shape[1:3] == (size, size):
        return frames
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _first_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[-200:]


def shared_files(rows: pd.DataFrame, col: str) -> set[str]:
    """Media files that hold several utterances (cut by start/end)."""
    if col not in rows.columns:
        return set()
    paths = rows[col][rows[col] != ""]
    return set(paths[paths.duplicated(keep=False)])


def decode_chunk(manifest: Manifest, start: int, end: int, p: DecodeParams, decoder: ClipDecoder,
                 shared: dict[str, set[str]]):
    """Decode rows [start, end): (chunk arrays, problems as dicts with the modality that was masked)."""
    blank_audio = np.zeros(0, np.float32)
    blank_frames = np.zeros((p.frames, p.size, p.size, 3), np.uint8)
    out = {"audio": [], "video": []}
    ok = {"audio": [], "video": []}
    problems = []
    for _, r in manifest.rows.iloc[start:end].iterrows():
        has_span = pd.notna(r.get("start", np.nan)) and pd.notna(r.get("end", np.nan))
        span = (float(r["start"]), float(r["end"])) if has_span else None
        for col, decode, blank in (("audio", decoder.audio, blank_audio), ("video", decoder.frames, blank_frames)):
            rel = r.get(col, "") or ""
            if rel:
                data, problem = decode(rel, span if rel in shared[col] else None)
            else:
                data, problem = blank, f"no {col} path in the manifest"
            if problem:
                prob = Problem(r["utt_id"], str(decoder.root / rel), problem)
                if p.on_bad_media == "fail":
                    raise MediaError(f"{prob}. Set decode.on_bad_media: mask to mask it and go on.")
                problems.append({**asdict(prob), "modality": col, "action": "masked"})
            for note in decoder.trimmed:
                problems.append({**asdict(Problem(r["utt_id"], str(decoder.root / rel), note)),
                                 "modality": col, "action": "trimmed"})
            decoder.trimmed.clear()
            out[col].append(data)
            ok[col].append(problem is None)
    a_ok, v_ok = np.array(ok["audio"], bool), np.array(ok["video"], bool)
    arrays = {**ragged(out["audio"], "audio", np.float32), "frames": np.stack(out["video"]),
              "audio_valid": a_ok, "video_valid": v_ok, "valid": a_ok & v_ok}
    return arrays, problems


def decode_dataset(manifest: Manifest, out_path: str | Path, p: DecodeParams, progress=None) -> dict:
    """Decode every utterance of `manifest` into the media store at `out_path` (resumable)."""
    if p.on_bad_media not in ("mask", "fail") or p.long_clip not in ("trim", "mask"):
        raise ValueError("decode.on_bad_media must be mask|fail and decode.long_clip trim|mask")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    config = asdict(p)
    run_fp = fingerprint({"decode": config, "manifest": manifest.rows.to_dict("list"), "root": manifest.meta.root})
    run = ChunkedRun(out_path, run_fp)
    decoder = ClipDecoder(Path(manifest.meta.root), p)
    shared = {"audio": shared_files(manifest.rows, "audio"), "video": shared_files(manifest.rows, "video")}
    n = len(manifest)
    computed, problems = run_chunks(run, n, p.chunk_size,
                                    lambda s, e: decode_chunk(manifest, s, e, p, decoder, shared), progress)
    attrs = {"kind": "media", "dataset": manifest.meta.dataset, "sample_rate": p.sample_rate,
             "frames": p.frames, "frame_size": p.size, "frame_sampling": "uniform over the clip",
             "fingerprint": run_fp, "decode_config": config, "decoder": "decord"}
    layout = StoreLayout(fixed=["frames", "audio_valid", "video_valid"], ragged=["audio"], compress=["frames"])
    assemble(run, manifest.utt_ids, len(chunk_bounds(n, p.chunk_size)), layout, attrs)
    return {"utterances": n, "chunks_computed": computed, "problems": problems,
            "masked_audio": sum(q["modality"] == "audio" and q["action"] == "masked" for q in problems),
            "masked_video": sum(q["modality"] == "video" and q["action"] == "masked" for q in problems),
            "trimmed": sum(q["action"] == "trimmed" for q in problems)}
