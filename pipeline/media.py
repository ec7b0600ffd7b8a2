"""Decoding media once into the media store: 16 kHz mono audio and a canonical frame sampling.

Two readers sit behind one interface (`MediaReader`), chosen by `decode.reader`: decord (the default where it
imports; it has wheels for Linux and macOS x86_64 and Windows only, and its last release is from 2021) and
PyAV (every platform; `auto` picks it when decord does not import). They give the same numbers:

- audio: a reader decodes the file's best audio stream at the stream's own rate, down-mixed to mono by
  ffmpeg's default matrix (stereo: (L + R) / sqrt 2); then one resampler for both readers, `resample_audio`
  (libswresample through PyAV's `AudioResampler`, flushed at the end), brings it to `decode.sample_rate`, so
  the rate written to the store is the true rate of the samples. decord's own resampling is not used:
  against a pure tone it is wrong (44.1 kHz -> 16 kHz leaves a residual as large as the tone), and its
  multi-channel output without down-mix is not the decoded signal.
- video: frames in presentation order, indexed from 0, rgb24 at their native size, resized here with torch's
  antialiased bilinear interpolation (decord's own scaler fails on some small target sizes).

Measured on the bundled sample and on H.264/AAC, VP9 and WAV test files (tests/test_readers.py): identical
frames, audio equal within 2e-7 at the same length. The last bits of the audio differ (two ffmpeg builds), so
the reader is part of the store's fingerprint and is named in its attributes (`decoder`, `decoder_version`).
MPEG-4 part 2 (DivX) decodes within 1 grey level, but decord's frame seek in an AVI with B-frames returns
frames of other indices; PyAV decodes in order and seeks only back to a keyframe whose frames it has counted.

A clip is cut by the manifest's start/end only when its file is shared by several utterances (a dialogue-level
wav or avi, as in IEMOCAP); a per-utterance file is read whole. An utterance without a media path (a text-only
dataset, or one with media for some utterances only) has that modality absent: masked, not a problem. A dataset
with no media path at all decodes to a store with no audio samples and no frames (`text_only`).

A media store's fingerprint covers the content of every media file it read (`media_content`: sha256 per file,
cached by path, size, mtime_ns and ctime_ns in the store's `media_files` dataset, so a re-run reads again only
the files that changed), so a clip replaced under the same name changes the fingerprint, and with it every
feature store computed from the media store. Decoded audio is clipped to [-1, 1] (a resampler's or codec's
overshoot); audio beyond 2 in magnitude is bad input.

Bad input is a `Problem` naming the utterance and file: missing or unreadable files, a video without an
audio track, empty or non-finite audio, clips longer than `max_clip_seconds`. Per `decode.on_bad_media`,
decoding stops with a `MediaError` (fail) or the utterance's modality is masked (mask): zeros in the
store, `audio_valid` / `video_valid` False, and the problem listed in the stage's summary.
"""
from __future__ import annotations

import hashlib
import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import UserError
from pipeline.errors import first_line
from pipeline.manifest import Manifest
from pipeline.params import DecodeParams, as_dict
from pipeline.problems import MODALITY_OF_COLUMN, Problem
from pipeline.store import (ChunkedRun, StoreLayout, assemble, chunk_bounds, fingerprint, ragged, run_chunks,
                            writer_lock)

READERS = ("auto", "decord", "pyav")
AUDIO_PEAK_LIMIT = 2.0      # decoded audio beyond this is bad input; up to it, an overshoot clipped to [-1, 1]
MEDIA_FILES = "media_files"   # the store's dataset: JSON {path: [size, mtime_ns, ctime_ns, sha256]}
_RESAMPLE_BLOCK = 1 << 16   # samples per frame fed to the resampler


class MediaError(UserError, RuntimeError):
    pass


class NoAudioTrack(Exception):
    """The file opens but holds no audio stream."""


# -- readers ------------------------------------------------------------------------------------------

class VideoClip:
    """An open video: `len(clip)` frames at `clip.fps`; `get(indices)` -> [F, H, W, 3] uint8 rgb24."""
    fps: float

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, indices: list[int]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MediaReader:
    """Reads one file's audio (mono float32 at a given rate) or opens its video stream."""
    name: str

    @property
    def version(self) -> str:
        raise NotImplementedError

    def native_audio(self, path: Path) -> tuple[np.ndarray, int]:
        """The best audio stream, mono float32 at the stream's rate; `NoAudioTrack` when there is none."""
        raise NotImplementedError

    def audio(self, path: Path, sample_rate: int) -> np.ndarray:
        x, rate = self.native_audio(path)
        return resample_audio(x, rate, sample_rate)

    def open_video(self, path: Path) -> VideoClip:
        raise NotImplementedError


def resample_audio(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 `x` at `rate` -> at `target` (libswresample's default filter, through PyAV; flushed)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if rate == target or x.size == 0:
        return x
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    out = []
    for s in range(0, x.size, _RESAMPLE_BLOCK):
        frame = av.AudioFrame.from_ndarray(x[None, s:s + _RESAMPLE_BLOCK], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, s, Fraction(1, rate)
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)


def _decord():
    import decord

    decord.bridge.set_bridge("native")
    decord.logging.set_level(decord.logging.QUIET)
    return decord


class DecordReader(MediaReader):
    """decord's VideoReader; its AudioReader at the stream's own rate (its resampler is not used).

    decord's AudioReader keeps about the decoded audio of every file it opens (docs/design.md, "Known traps"):
    `auto` reads audio with PyAV instead."""
    name = "decord"

    def __init__(self):
        self._decord = _decord()

    @property
    def version(self) -> str:
        return f"decord {self._decord.__version__}"

    def native_audio(self, path: Path) -> tuple[np.ndarray, int]:
        d = self._decord
        try:
            reader = d.AudioReader(str(path), ctx=d.cpu(0), sample_rate=-1, mono=True)
        except Exception as e:  # DECORDError with ffmpeg's reason
            if "audio stream" in str(e):
                raise NoAudioTrack() from None
            raise
        x = reader[:].asnumpy().reshape(-1).astype(np.float32)
        return x, _audio_rate(path)   # decord does not tell the rate it decoded at (sample_rate=-1)

    def open_video(self, path: Path) -> VideoClip:
        return _DecordClip(self._decord, path)


class _DecordClip(VideoClip):
    def __init__(self, decord, path: Path):
        self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
        self.fps = float(self._vr.get_avg_fps() or 25.0)

    def __len__(self) -> int:
        return len(self._vr)

    def get(self, indices: list[int]) -> np.ndarray:
        return self._vr.get_batch(list(indices)).asnumpy()

    def close(self) -> None:
        self._vr = None


def _audio_rate(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        stream = c.streams.best("audio")
        if stream is None:
            raise NoAudioTrack()
        return int(stream.rate)


class PyAVReader(MediaReader):
    """PyAV (libav* bundled in its wheels): audio decoded and down-mixed frame by frame; video decoded in order."""
    name = "pyav"

    @property
    def version(self) -> str:
        import av

        return f"av {av.__version__}"

    def native_audio(self, path: Path) -> tuple[np.ndarray, int]:
        import av

        with av.open(str(path)) as c:
            stream = c.streams.best("audio")
            if stream is None:
                raise NoAudioTrack()
            rate = int(stream.rate)
            mono = av.AudioResampler(format="flt", layout="mono", rate=rate)   # down-mix only
            parts = []
            for frame in c.decode(stream):
                parts += [f.to_ndarray().reshape(-1) for f in mono.resample(frame)]
            parts += [f.to_ndarray().reshape(-1) for f in mono.resample(None)]
        return (np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)), rate

    def open_video(self, path: Path) -> VideoClip:
        return _PyAVClip(path)


class _PyAVClip(VideoClip):
    """Frames by index, decoded in order from the start. The decoder stays where it stopped, so the next
    utterance of a shared file (IEMOCAP's dialogue avi, rows in start order) goes on from there; a request
    behind it seeks to the keyframe before the wanted frame, whose timestamp it has seen, and counts on."""

    def __init__(self, path: Path):
        import av

        self._av, self._path = av, path
        self._open()
        n = self._stream.frames
        if not n:                                  # no frame count in the header (mkv, webm): count packets
            n = sum(1 for pkt in self._container.demux(self._stream) if pkt.size)
            self._open()
        self._n = int(n)
        self.fps = float(self._stream.average_rate or 0) or 25.0
        self._pts: list[int | None] = []           # pts of every frame decoded so far, by index
        self._index_of: dict[int, int] = {}

    def _open(self) -> None:
        if getattr(self, "_container", None) is not None:
            self._container.close()
        self._container = self._av.open(str(self._path))
        self._stream = self._container.streams.best("video")
        if self._stream is None:
            self._container.close()
            raise ValueError("no video stream")
        self._stream.thread_type = "AUTO"
        self._frames = self._container.decode(self._stream)
        self._next = 0                             # index of the frame `_read` gives next
        self._pending = None                       # a frame decoded by `_rewind`, not yet given

    def __len__(self) -> int:
        return self._n

    def _rewind(self, index: int) -> None:
        pts = self._pts[index] if index < len(self._pts) else None
        if pts is not None:
            try:
                self._container.seek(pts, stream=self._stream, backward=True, any_frame=False)
                self._frames = self._container.decode(self._stream)
                first = next(self._frames, None)
            except self._av.error.FFmpegError:
                first = None
            if first is not None and first.pts in self._index_of and self._index_of[first.pts] <= index:
                self._next, self._pending = self._index_of[first.pts], first
                return
        self._open()                               # no usable timestamp or seek: decode again from the start

    def _read(self):
        frame, self._pending = self._pending, None
        return frame if frame is not None else next(self._frames, None)

    def get(self, indices: list[int]) -> np.ndarray:
        want = sorted(set(int(i) for i in indices))
        if want and want[0] < self._next:
            self._rewind(want[0])
        got: dict[int, np.ndarray] = {}
        wanted = set(want)
        while want and self._next <= want[-1]:
            frame = self._read()
            if frame is None:
                raise ValueError(f"frame {self._next} of {self._n} could not be decoded")
            i = self._next
            if i == len(self._pts):
                self._pts.append(frame.pts)
                if frame.pts is not None:
                    self._index_of.setdefault(frame.pts, i)
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            self._next += 1
        return np.stack([got[int(i)] for i in indices])

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class DecordVideoPyAVAudio(DecordReader):
    """`auto` where decord imports: decord's video (the design's reader) and PyAV's audio, since decord's
    AudioReader keeps the decoded audio of every file it opens (docs/design.md, "Known traps")."""
    name = "decord+pyav-audio"

    def __init__(self):
        super().__init__()
        self._audio = PyAVReader()

    @property
    def version(self) -> str:
        return f"{super().version}, {self._audio.version}"

    def native_audio(self, path: Path) -> tuple[np.ndarray, int]:
        return self._audio.native_audio(path)


def pick_reader(name: str = "auto") -> MediaReader:
    """The reader `decode.reader` names; `auto`: decord's video with PyAV's audio where decord imports, else
    PyAV for both."""
    if name not in READERS:
        raise ValueError(f"decode.reader must be one of {'|'.join(READERS)}, not {name!r}")
    if name in ("auto", "decord"):
        try:
            return DecordVideoPyAVAudio() if name == "auto" else DecordReader()
        except (ImportError, OSError) as e:
            if name == "decord":
                raise MediaError(f"decode.reader: decord does not import here ({e}); it has wheels for Linux and "
                                 "macOS x86_64 and Windows only. Use reader: pyav (or auto).") from e
    return PyAVReader()


# -- one utterance ------------------------------------------------------------------------------------

def frame_indices(first: int, last: int, count: int) -> np.ndarray:
    """`count` frame indices spread uniformly over [first, last] (repeating when the clip is short)."""
    return np.linspace(first, max(first, last), count).round().astype(np.int64)


class ClipDecoder:
    """Decodes one utterance's audio and frames; keeps the last video open (rows come dialogue by dialogue)."""

    def __init__(self, root: Path | None, p: DecodeParams, reader: MediaReader | None = None):
        self.root, self.p = root, p
        self.reader = reader or pick_reader(p.reader)
        self._video_path, self._video = None, None
        self.trimmed: list[str] = []   # notes on clips cut to max_clip_seconds (long_clip: trim)

    def audio(self, rel: str, span: tuple[float, float] | None) -> tuple[np.ndarray, str | None]:
        path = self.root / rel
        if not path.exists():
            return np.zeros(0, np.float32), "audio file missing"
        try:
            x = self.reader.audio(path, self.p.sample_rate)
        except NoAudioTrack:
            return np.zeros(0, np.float32), "no audio track"
        except Exception as e:  # the reader's own error, with ffmpeg's reason
            return np.zeros(0, np.float32), f"unreadable audio ({first_line(e, -200)})"
        if span is not None:
            x = x[int(span[0] * self.p.sample_rate):int(span[1] * self.p.sample_rate)]
        if x.size == 0:
            return x, "empty audio"
        if not np.isfinite(x).all():
            return np.zeros(0, np.float32), "non-finite audio samples"
        peak = float(np.abs(x).max())
        if peak > AUDIO_PEAK_LIMIT:   # not a codec's overshoot: samples of another scale (int PCM read as float)
            return np.zeros(0, np.float32), f"audio samples outside [-1, 1] (peak {peak:.4g})"
        if peak > 1.0:
            x = np.clip(x, -1.0, 1.0)
        limit = int(self.p.max_clip_seconds * self.p.sample_rate)
        if x.size > limit:
            seconds = x.size / self.p.sample_rate
            if self.p.long_clip == "mask":
                return np.zeros(0, np.float32), f"audio runs {seconds:.1f} s > max_clip_seconds"
            self.trimmed.append(f"audio trimmed from {seconds:.1f} s to max_clip_seconds")
            x = x[:limit]
        return x, None

    def frames(self, rel: str, span: tuple[float, float] | None) -> tuple[np.ndarray, str | None]:
        blank = np.zeros((self.p.frames, self.p.size, self.p.size, 3), np.uint8)
        path = self.root / rel
        if not path.exists():
            return blank, "video file missing"
        try:
            if self._video_path != path:
                self.close()
                self._video = self.reader.open_video(path)
                self._video_path = path
            clip = self._video
            n, fps = len(clip), clip.fps
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
            frames = clip.get(frame_indices(first, last, self.p.frames).tolist())
            return resize_frames(frames, self.p.size), None
        except Exception as e:
            self.close()
            return blank, f"unreadable video ({first_line(e, -200)})"

    def close(self) -> None:
        if self._video is not None:
            self._video.close()
        self._video, self._video_path = None, None


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """[F, H, W, 3] uint8 -> [F, size, size, 3] uint8."""
    import torch
    from torch.nn import functional as F

    if frames.shape[1:3] == (size, size):
        return frames
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# -- a dataset ----------------------------------------------------------------------------------------

def shared_files(rows: pd.DataFrame, col: str) -> set[str]:
    """Media files that hold several utterances (cut by start/end)."""
    if col not in rows.columns:
        return set()
    paths = rows[col][rows[col] != ""]
    return set(paths[paths.duplicated(keep=False)])


def media_counts(rows: pd.DataFrame) -> dict[str, int]:
    """Rows with a path per modality ({'audio': k, 'video': m}); 0 for a column that is not there."""
    return {col: int((rows[col] != "").sum()) if col in rows.columns else 0 for col in ("audio", "video")}


def decode_chunk(manifest: Manifest, start: int, end: int, p: DecodeParams, decoder: ClipDecoder,
                 shared: dict[str, set[str]], frames_per_row: int | None = None):
    """Decode rows [start, end): (chunk arrays, problems as dicts with the modality that was masked).

    A row without a path for a modality has it absent: blank, not valid, no problem."""
    frames_per_row = p.frames if frames_per_row is None else frames_per_row
    blank_audio = np.zeros(0, np.float32)
    blank_frames = np.zeros((frames_per_row, p.size, p.size, 3), np.uint8)
    out = {"audio": [], "video": []}
    ok = {"audio": [], "video": []}
    problems = []
    for _, r in manifest.rows.iloc[start:end].iterrows():
        has_span = pd.notna(r.get("start", np.nan)) and pd.notna(r.get("end", np.nan))
        span = (float(r["start"]), float(r["end"])) if has_span else None
        for col, decode, blank in (("audio", decoder.audio, blank_audio), ("video", decoder.frames, blank_frames)):
            rel = r.get(col, "") or ""
            if not rel:
                out[col].append(blank)
                ok[col].append(False)
                continue
            data, problem = decode(rel, span if rel in shared[col] else None)
            if problem:
                prob = Problem(r["utt_id"], str(decoder.root / rel), problem, MODALITY_OF_COLUMN[col], "masked")
                if p.on_bad_media == "fail":
                    raise MediaError(f"{prob}. Set decode.on_bad_media: mask to mask it and go on.")
                problems.append(prob.as_dict())
            for note in decoder.trimmed:
                problems.append(Problem(r["utt_id"], str(decoder.root / rel), note, MODALITY_OF_COLUMN[col],
                                        "trimmed").as_dict())
            decoder.trimmed.clear()
            out[col].append(data)
            ok[col].append(problem is None)
    a_ok, v_ok = np.array(ok["audio"], bool), np.array(ok["video"], bool)
    frames = np.stack(out["video"]) if out["video"] else np.zeros((0,) + blank_frames.shape, np.uint8)
    arrays = {**ragged(out["audio"], "audio", np.float32), "frames": frames,
              "audio_valid": a_ok, "video_valid": v_ok, "valid": a_ok & v_ok}
    return arrays, problems


def file_content_hash(path: Path) -> str:
    """sha256 of a file's bytes (first 32 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def previous_media_files(store: str | Path | None) -> dict[str, list]:
    """The content-hash cache a media store kept (`MEDIA_FILES`); {} when there is none or it cannot be read
    (a cache: a miss only costs a re-read)."""
    if store is None or not Path(store).is_file():
        return {}
    import h5py

    try:
        with h5py.File(store, "r") as f:
            cache = json.loads(f[MEDIA_FILES][()]) if MEDIA_FILES in f else {}
        return cache if isinstance(cache, dict) else {}
    except Exception:
        return {}


def media_content(manifest: Manifest, cache: dict[str, list] | None = None) -> dict[str, list]:
    """{media path: [size, mtime_ns, ctime_ns, sha256 of the content]} of every file the manifest names; a
    file whose size, mtime and ctime match its `cache` entry is not read again. A missing or unreadable file
    gets a digest saying so (decode masks it)."""
    cache = cache or {}
    root = Path(manifest.meta.root) if manifest.meta.root else None
    rels = sorted({v for col in ("audio", "video") if col in manifest.rows.columns
                   for v in manifest.rows[col] if v})
    out: dict[str, list] = {}
    for rel in rels:
        path = root / rel if root is not None else Path(rel)
        try:
            st = os.stat(path)
        except OSError as e:
            out[rel] = [None, None, None, f"missing ({e.strerror})"]
            continue
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        old = cache.get(rel)
        if isinstance(old, list) and len(old) == 4 and old[:3] == key and isinstance(old[3], str) and len(old[3]) == 32:
            out[rel] = old
            continue
        try:
            out[rel] = key + [file_content_hash(path)]
        except OSError as e:
            out[rel] = key + [f"unreadable ({e.strerror})"]
    return out


def decode_fingerprint(manifest: Manifest, p: DecodeParams, reader: str | None = None,
                       content: dict[str, list] | None = None, cache_from: str | Path | None = None) -> str:
    """The fingerprint of the media store `decode_dataset` writes for `manifest` under `p` with `reader`
    (default: the one `decode.reader` picks on this machine) from media files of `content` (`media_content`;
    default: computed now, with the hashes the store at `cache_from` kept). The reader is in it: the two
    readers' audio differs in the last bits; so is every file's content hash."""
    reader = reader or pick_reader(p.reader).name
    if content is None:
        content = media_content(manifest, previous_media_files(cache_from))
    return fingerprint({"decode": as_dict(p), "manifest": manifest.rows.to_dict("list"), "root": manifest.meta.root,
                        "reader": reader, "content": {rel: v[3] for rel, v in sorted(content.items())}})


def decode_dataset(manifest: Manifest, out_path: str | Path, p: DecodeParams, progress=None,
                   reader: MediaReader | str | None = None) -> dict:
    """Decode every utterance of `manifest` into the media store at `out_path` (resumable).

    `reader` overrides `decode.reader` (a name or a `MediaReader`)."""
    if p.on_bad_media not in ("mask", "fail") or p.long_clip not in ("trim", "mask"):
        raise ValueError("decode.on_bad_media must be mask|fail and decode.long_clip trim|mask")
    if not isinstance(reader, MediaReader):
        reader = pick_reader(reader or p.reader)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    counts = media_counts(manifest.rows)
    text_only = not any(counts.values())
    frames_per_row = p.frames if counts["video"] else 0   # no video anywhere: a store without frames
    with writer_lock(out_path):
        return _decode_locked(manifest, out_path, p, progress, reader, counts, text_only, frames_per_row)


def _decode_locked(manifest, out_path, p, progress, reader, counts, text_only, frames_per_row) -> dict:
    content = media_content(manifest, previous_media_files(out_path))
    run_fp = decode_fingerprint(manifest, p, reader.name, content)
    run = ChunkedRun(out_path, run_fp)
    decoder = ClipDecoder(Path(manifest.meta.root) if manifest.meta.root else None, p, reader)
    shared = {"audio": shared_files(manifest.rows, "audio"), "video": shared_files(manifest.rows, "video")}
    n = len(manifest)
    try:
        computed, problems = run_chunks(
            run, n, p.chunk_size,
            lambda s, e: decode_chunk(manifest, s, e, p, decoder, shared, frames_per_row), progress)
    finally:
        decoder.close()
    attrs = {"kind": "media", "dataset": manifest.meta.dataset, "sample_rate": p.sample_rate,
             "frames": frames_per_row, "frame_size": p.size, "frame_sampling": "uniform over the clip",
             "fingerprint": run_fp, "decode_config": as_dict(p), "decoder": reader.name,
             "decoder_version": reader.version, "text_only": text_only}
    layout = StoreLayout(fixed=["frames", "audio_valid", "video_valid"], ragged=["audio"],
                         compress=["frames"] if frames_per_row else [])
    assemble(run, manifest.utt_ids, len(chunk_bounds(n, p.chunk_size)), layout, attrs,
             extra={MEDIA_FILES: json.dumps(content)})
    return {"utterances": n, "chunks_computed": computed, "problems": problems, "text_only": text_only,
            "reader": reader.name,
            "absent_audio": n - counts["audio"], "absent_video": n - counts["video"],
            "masked_audio": sum(q["modality"] == "audio" and q["action"] == "masked" for q in problems),
            "masked_video": sum(q["modality"] == "visual" and q["action"] == "masked" for q in problems),
            "trimmed": sum(q["action"] == "trimmed" for q in problems)}
