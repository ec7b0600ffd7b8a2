"""The bundled sample: a small synthetic conversational dataset with real media files.

Each utterance is an mp4 (H.264 video + AAC audio track). Its emotion is planted independently in each
modality with probabilities `p_text`, `p_audio`, `p_visual`:

- text: an emotional sentence, or else a filler sentence shared by all emotions;
- audio: a voiced tone whose pitch contour, loudness, tempo and harshness follow the emotion, or else
  unvoiced breathy noise;
- visual: a drawn face whose colour, mouth and brows follow the emotion, or else a grey face seen blurred.

So no single modality solves the task and fusion can. About one utterance in nine carries no cue at all:
only context can help there, since speakers keep a mood across turns (each turn keeps the speaker's
previous emotion with probability MOOD_PERSISTENCE). Everything is deterministic in `seed`.
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.datasets.base import ADAPTERS
from pipeline.params import DatasetParams, SampleParams

LABELS = ["neutral", "joy", "sadness", "anger"]
MOOD_PERSISTENCE = 0.6
SPEAKER_NAMES = ["Ada", "Ben", "Cleo", "Dev"]

EMOTION_TEXT = {
    "neutral": ["The meeting is at {t} o'clock.", "I put the {o} on the table.", "We take the bus on {d}.",
                "The report has {n} pages.", "Let me check the {o} list."],
    "joy": ["I am so happy about the {o}!", "This is wonderful, I love it!", "What a great {d}, I'm thrilled!",
            "Yay, we did it, this is amazing!", "I'm delighted you brought the {o}!"],
    "sadness": ["I feel so down about the {o}.", "It's hopeless, I miss them so much.",
                "Nothing went right on {d}, I'm heartbroken.", "I just want to cry.",
                "I lost the {o} and I feel miserable."],
    "anger": ["This is outrageous, who took my {o}?", "I'm furious, stop doing that!",
              "How dare you ruin {d}!", "I've had it with your excuses!", "Get out, I'm so angry about the {o}!"],
}
FILLER_TEXT = ["So, about the {o}.", "Well, you know how it is on {d}.", "Right, and then there is the {o}.",
               "Okay. Hmm.", "Tell me more about {d}.", "I was thinking about the {o}."]
SLOTS = {"o": ["sandwich", "car", "letter", "cake", "laptop", "plant"],
         "d": ["Monday", "Friday", "the weekend", "Tuesday"],
         "t": ["two", "three", "nine"], "n": ["four", "twelve", "thirty"]}

# pitch (Hz) start->end, loudness (0-1), syllables per second, harshness (noise share)
VOICE = {"neutral": (140, 140, 0.35, 4.0, 0.02), "joy": (230, 300, 0.55, 6.0, 0.02),
         "sadness": (120, 85, 0.15, 2.0, 0.01), "anger": (190, 175, 0.9, 7.0, 0.25)}
# face RGB, mouth curvature (+ smile, - frown), mouth opening, brow slant (+ angry V, - sad)
FACE = {"neutral": ((205, 170, 140), 0.0, 0.1, 0.0), "joy": ((235, 200, 90), 1.0, 0.4, 0.0),
        "sadness": ((120, 150, 210), -1.0, 0.1, -1.0), "anger": ((220, 60, 50), -0.4, 0.8, 1.0)}


def generate(out_dir: str | Path, p: SampleParams) -> Path:
    """Write the sample (clips/*.mp4 and transcripts.jsonl) under `out_dir`; return the JSONL path."""
    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(p.seed)
    order = rng.permutation(p.dialogues)
    n_dev = n_test = max(1, round(0.15 * p.dialogues))
    split_of = {int(d): ("test" if k < n_test else "dev" if k < n_test + n_dev else "train")
                for k, d in enumerate(order)}
    rows = []
    for d in range(p.dialogues):
        n_speakers = int(rng.integers(2, 4))
        speakers = SPEAKER_NAMES[:n_speakers]
        pitch_shift = {s: float(rng.uniform(0.85, 1.15)) for s in speakers}
        mood = {s: LABELS[int(rng.integers(len(LABELS)))] for s in speakers}
        turns = int(rng.integers(p.min_turns, p.max_turns + 1))
        background = rng.integers(0, 80, size=3)
        for u in range(turns):
            spk = speakers[int(rng.integers(n_speakers))] if u else speakers[0]
            if rng.random() > MOOD_PERSISTENCE:
                mood[spk] = LABELS[int(rng.integers(len(LABELS)))]
            label = mood[spk]
            carries = {m: bool(rng.random() < q) for m, q in
                       (("text", p.p_text), ("audio", p.p_audio), ("visual", p.p_visual))}
            text = _sentence(rng, EMOTION_TEXT[label] if carries["text"] else FILLER_TEXT)
            seconds = float(rng.uniform(p.min_seconds, p.max_seconds))
            audio = _voice(rng, label if carries["audio"] else None, seconds, p.sample_rate, pitch_shift[spk])
            video = _face_video(rng, label if carries["visual"] else None, seconds, p.fps, p.size, background)
            rel = f"clips/dia{d}_utt{u}.mp4"
            write_mp4(out / rel, video, p.fps, audio, p.sample_rate)
            rows.append({"utt_id": f"sample_dia{d}_utt{u}", "split": split_of[d], "dialogue_id": f"dia{d}",
                         "turn": u, "speaker": spk, "text": text, "label": label, "video": rel, "audio": rel,
                         "cues": "".join(m[0] for m, c in carries.items() if c)})
    path = out / "transcripts.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@ADAPTERS.register("sample")
def build(name: str, params: DatasetParams):
    """The sample's adapter: its JSONL is a generic manifest with a fixed label order."""
    from pipeline.datasets import generic
    from pipeline.manifest import ManifestError

    if not (params.manifest or params.root):
        raise ManifestError(f"data.{name}: the sample adapter needs 'root' (the folder make_sample writes)")
    params = DatasetParams(**{**params.__dict__, "manifest": params.manifest or str(Path(params.root) / "transcripts.jsonl"),
                              "labels": params.labels or LABELS})
    return generic.build(name, params, drop_columns=("cues",))


def _sentence(rng, templates) -> str:
    t = templates[int(rng.integers(len(templates)))]
    return t.format(**{k: v[int(rng.integers(len(v)))] for k, v in SLOTS.items()})


def _voice(rng, label, seconds, sr, shift) -> np.ndarray:
    n = int(seconds * sr)
    t = np.arange(n) / sr
    if label is None:  # breathy, unvoiced: no pitch, low energy
        return (0.05 * rng.standard_normal(n) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)).astype(np.float32)
    f0a, f0b, loud, rate, harsh = VOICE[label]
    f0 = shift * np.linspace(f0a, f0b, n) * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = np.clip(np.sin(np.pi * rate * t + rng.uniform(0, np.pi)), 0, None) ** 0.5
    x = loud * syllables * (voiced / 2.3 + harsh * rng.standard_normal(n))
    return np.clip(x, -1, 1).astype(np.float32)


def _face_video(rng, label, seconds, fps, size, background) -> np.ndarray:
    n = max(2, int(seconds * fps))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    colour, curve, opening, brow = FACE[label] if label else ((150, 150, 150), 0.0, 0.0, 0.0)
    cx0, cy0 = rng.uniform(0.4, 0.6, size=2)
    for i in range(n):
        cx = cx0 + 0.03 * np.sin(i / 3)
        cy = cy0 + 0.02 * np.cos(i / 4)
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = background
        face = (xx - cx) ** 2 + (yy - cy) ** 2 < 0.3 ** 2
        img[face] = colour
        if label is not None:
            for ex in (-0.1, 0.1):  # eyes and brows
                img[(xx - cx - ex) ** 2 + (yy - cy + 0.08) ** 2 < 0.03 ** 2] = (20, 20, 20)
                by = cy - 0.15 + brow * 0.04 * (np.abs(xx - cx) - 0.05) / 0.1 * np.sign(ex) * np.sign(xx - cx)
                img[(np.abs(xx - cx - ex) < 0.06) & (np.abs(yy - by) < 0.012)] = (30, 20, 10)
            mx = xx - cx
            open_now = opening * (0.5 + 0.5 * abs(np.sin(i * 1.3)))
            mouth_y = cy + 0.13 - curve * 0.25 * (0.12 ** 2 - mx ** 2) / 0.12
            mouth = (np.abs(mx) < 0.12) & (np.abs(yy - mouth_y) < 0.015 + 0.04 * open_now)
            img[mouth] = (60, 0, 0)
        else:  # a blurred, featureless face
            img = img * 0.7 + img.mean() * 0.3
        img += rng.normal(0, 4, size=img.shape)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray | None, sr: int) -> None:
    """H.264 video (+ AAC mono audio when given) with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        vs = container.add_stream("libx264", rate=fps)
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "18"}
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sr)
            astream.layout = "mono"
        for f in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        if astream is not None:
            hop = 1024
            for start in range(0, len(audio), hop):
                chunk = audio[start:start + hop][None, :].astype(np.float32)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate = sr
                frame.pts = start
                frame.time_base = Fraction(1, sr)
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    tmp.replace(path)
