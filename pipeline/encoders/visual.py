"""Visual encoders over the media store's canonical frames.

- `cnn3d`: a C3D-style 3D-CNN on a clip of `frames` frames taken uniformly from the utterance's stored
  frames (DialogueTRM's visual input comes from a 3D-CNN on 16-frame clips). Weights from a `state_dict`
  file; without one it is a seeded random-init network, and the store says so
  (`weights: random-init(seed=...)`) — enough to carry colour and motion cues, not a trained model.
"""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.configs import Cnn3dConfig, HFVideoConfig, VisExtNetConfig
from pipeline.encoders.base import Encoder, HFEncoder, register
from pipeline.encoders.layers import HiddenLayers
from pipeline.manifest import Manifest
from pipeline.params import ParamsError
from pipeline.problems import masked_problem
from pipeline.runtime import resolve_device, weights_hash
from pipeline.store import MediaStore


def decoded_video(rows: pd.DataFrame, media: MediaStore) -> tuple[list[str], np.ndarray, list[dict]]:
    """utt_ids of `rows`, whether decode kept their video, and a problem for each one it masked."""
    ids = rows["utt_id"].tolist()
    valid = media.fixed("video_valid", ids).astype(bool)
    problems = [masked_problem(r, r.get("video", ""), "video masked at decode", "visual")
                for (_, r), ok in zip(rows.iterrows(), valid) if not ok]
    return ids, valid, problems


class C3D(nn.Module):
    """Four conv3d-BN-ReLU-pool blocks, global average pool, linear projection to `out_dim`."""

    def __init__(self, width: int = 32, out_dim: int = 128):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for i in range(4):
            blocks += [nn.Conv3d(chans[i], chans[i + 1], 3, padding=1), nn.BatchNorm3d(chans[i + 1]), nn.ReLU(),
                       nn.MaxPool3d((1, 2, 2) if i == 0 else 2, ceil_mode=True)]
        self.features = nn.Sequential(*blocks)
        self.proj = nn.Linear(chans[-1], out_dim)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:   # [B, 3, F, H, W] in [0, 1]
        return self.proj(self.features(clip).mean(dim=(2, 3, 4)))




@register
class Cnn3dEncoder(Encoder):
    needs_media = True
    Config = Cnn3dConfig

    def __init__(self, name, config: Cnn3dConfig):
        super().__init__(name, config)
        torch.manual_seed(config.seed)
        self.net = C3D(config.width, config.out_dim)
        if config.weights:
            try:
                self.net.load_state_dict(torch.load(config.weights, map_location="cpu", weights_only=True))
            except (RuntimeError, OSError, pickle.UnpicklingError) as e:
                raise ParamsError(f"encoders.{name}.weights: {config.weights} is not a state_dict of "
                                  f"C3D(width={config.width}, out_dim={config.out_dim}): {e}") from e
        self.device = resolve_device(config.device)
        self.net.to(self.device).eval()

    @property
    def dim(self) -> int:
        return self.config.out_dim

    def provenance(self):
        c = self.config
        return {**super().provenance(), "weights": c.weights or f"random-init(seed={c.seed})",
                "weights_hash": weights_hash(c.weights) if c.weights else None, "frames_used": c.frames}

    def encode(self, rows: pd.DataFrame, manifest: Manifest, media: MediaStore):
        ids, valid, problems = decoded_video(rows, media)
        pooled = np.zeros((len(ids), self.dim), np.float32)
        with torch.inference_mode():
            for s in range(0, len(ids), self.config.batch_size):
                frames = np.stack([sample_frames(media.frames(u), self.config.frames)
                                   for u in ids[s:s + self.config.batch_size]])  # [B, F, H, W, 3]
                clip = torch.from_numpy(frames).to(self.device).permute(0, 4, 1, 2, 3).float() / 255.0
                pooled[s:s + len(frames)] = self.net(clip).float().cpu().numpy()
        pooled[~valid] = 0.0
        return {"pooled": pooled, "valid": valid}, problems


def sample_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """`count` of the store's canonical frames, uniformly (repeating when the store holds fewer)."""
    from pipeline.media import frame_indices

    return frames[frame_indices(0, len(frames) - 1, count)]




@register
class HFVideoEncoder(HiddenLayers, HFEncoder):
    """Video transformers via transformers (TelME's visual student input: TimeSformer on 8 frames).

    The model's `num_frames` frames are taken uniformly from the store's canonical frames and prepared by
    the model's own image processor (resize, crop, normalise). `layers` keeps several hidden states, each
    pooled alike (as transformers reports them: before the final LayerNorm that `last` includes)."""
    needs_media = True
    Config = HFVideoConfig

    def __init__(self, name, config: HFVideoConfig):
        super().__init__(name, config)
        self.load_model("AutoModel", "AutoImageProcessor")
        self.num_frames = int(getattr(self.model.config, "num_frames", 8))
        self.hidden_layers = self.kept_layers()

    def provenance(self):
        return {**super().provenance(), "frames_used": self.num_frames}

    def encode(self, rows: pd.DataFrame, manifest: Manifest, media: MediaStore):
        from pipeline.runtime import autocast_context, batched_with_oom_retry, clip_batch_size, prep_workers, worker_media

        ids, valid, problems = decoded_video(rows, media)
        pooled = np.zeros((len(ids), *self.pooled_shape), np.float32)

        path = media.path

        def prepare(batch_rows):   # runs in DataLoader workers: frames from the store, the model's processor
            store = worker_media(path)
            videos = [list(sample_frames(store.frames(ids[i]), self.num_frames)) for i in batch_rows]
            return self.processor(videos, return_tensors="pt")["pixel_values"]

        def run(batch_rows, pixel_values):
            with autocast_context(self.device, self.config.autocast):
                states = self.kept_states(self.model(pixel_values=pixel_values.to(self.device, non_blocking=True),
                                                     **self.model_kwargs()))
            vec = self.stack([h[:, 0] if self.config.pooling == "cls" else h[:, 1:].mean(1) for h in states])
            pooled[batch_rows] = vec.cpu().numpy()

        with torch.inference_mode():
            batched_with_oom_retry(np.flatnonzero(valid), clip_batch_size(self.config.batch_size, self.device), run,
                                   prepare=prepare,
                                   workers=prep_workers(self.config.prep_workers, self.device),
                                   pin_memory=self.device.type == "cuda")
        return {"pooled": pooled, "valid": valid}, problems




@register
class VisExtNetEncoder(HFEncoder):
    """VisExtNet-style face features (MaTAV/MultiEMO): detect the face in each frame, crop it, run a CNN on
    every face, average the CNN outputs over the frames that have a face.

    Frames without a face are left out of the average and counted in the stage summary; an utterance with no
    face in any frame is masked. MultiEMO's VGGFace2 weights are no longer published: give the classifier
    (e.g. a ResNet-101 with a 1000-way head, in transformers' format) as `weights`."""
    needs_media = True
    Config = VisExtNetConfig

    def __init__(self, name, config: VisExtNetConfig):
        super().__init__(name, config)
        if config.detector not in ("haar", "full"):
            raise ValueError(f"encoders.{name}.detector: haar | full, not {config.detector!r}")
        self.load_model("AutoModelForImageClassification")
        self.cascade = None
        if config.detector == "haar":
            import cv2

            self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    @property
    def dim(self) -> int:
        return int(self.model.config.num_labels)

    def provenance(self):
        return {**super().provenance(), "face_detector": self.config.detector}

    def face(self, frame: np.ndarray) -> np.ndarray | None:
        """The largest face of an RGB frame, cropped (None: no face)."""
        if self.cascade is None:
            return frame
        import cv2

        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        found = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                              minSize=(self.config.min_face, self.config.min_face))
        if len(found) == 0:
            return None
        x, y, w, h = max(found, key=lambda b: b[2] * b[3])
        return frame[y:y + h, x:x + w]

    @torch.inference_mode()
    def cnn(self, faces: list[np.ndarray]) -> np.ndarray:
        """The classifier's output for each face crop: [n, num_labels]."""
        from pipeline.runtime import autocast_context

        c = self.config
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1).float() / 255.0 for f in
                         [_resize(f, c.face_size) for f in faces]]).to(self.device)
        x = (x - torch.tensor(c.mean, device=self.device)[:, None, None]) / torch.tensor(c.std, device=self.device)[:, None, None]
        with autocast_context(self.device, c.autocast):
            return self.model(pixel_values=x).logits.float().cpu().numpy()

    def encode(self, rows: pd.DataFrame, manifest: Manifest, media: MediaStore):
        ids, valid, problems = decoded_video(rows, media)
        faces, owner = [], []
        for k, ((_, r), ok) in enumerate(zip(rows.iterrows(), valid)):
            if not ok:
                continue
            frames = media.frames(r["utt_id"])
            frames = sample_frames(frames, min(self.config.max_frames, len(frames)))
            found = [f for f in (self.face(fr) for fr in frames) if f is not None and f.size]
            if not found:
                valid[k] = False
                problems.append(masked_problem(r, r.get("video", ""), f"no face found in {len(frames)} frames", "visual"))
                continue
            if len(found) < len(frames):
                problems.append({**masked_problem(r, r.get("video", ""), f"no face in {len(frames) - len(found)} of "
                                                  f"{len(frames)} frames", "visual"), "action": "frames_masked"})
            faces.extend(found)
            owner.extend([k] * len(found))
        pooled = np.zeros((len(ids), self.dim), np.float32)
        if faces:
            outs = [self.cnn(faces[s:s + self.config.batch_size]) for s in range(0, len(faces), self.config.batch_size)]
            per_face, owner = np.concatenate(outs), np.array(owner)
            for k in np.unique(owner):
                pooled[k] = per_face[owner == k].mean(0)
        return {"pooled": pooled, "valid": valid}, problems


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from pipeline.media import resize_frames

    return resize_frames(img[None], size)[0]
