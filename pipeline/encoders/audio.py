"""Audio encoders over the media store's 16 kHz mono audio.

- `opensmile`: openSMILE functionals (eGeMAPSv02: 88-d, ComParE_2016: 6373-d), context-free, per utterance.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from pipeline.configs import HFAudioConfig, OpenSmileConfig
from pipeline.encoders.base import Encoder, HFEncoder, register
from pipeline.encoders.layers import HiddenLayers
from pipeline.manifest import Manifest
from pipeline.params import ParamsError
from pipeline.problems import masked_problem
from pipeline.runtime import autocast_context, batched_with_oom_retry, clip_batch_size, prep_workers, worker_media
from pipeline.store import MediaStore

OPENSMILE_SETS = {"eGeMAPSv02": 88, "ComParE_2016": 6373}




def unusable_audio(x: np.ndarray, sr: int, min_seconds: float, silence_dbfs: float) -> str | None:
    """Why a waveform gives no meaningful features (too short, silent), or None."""
    if len(x) < min_seconds * sr:
        return f"audio shorter than {min_seconds} s"
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    level = 20 * np.log10(rms) if rms > 0 else -np.inf
    if level < silence_dbfs:
        return f"silent audio ({level:.0f} dBFS < {silence_dbfs:g} dBFS)"
    return None


_SMILES: dict[tuple[int, str], object] = {}


def process_smile(feature_set: str):
    """This process's openSMILE extractor (each DataLoader worker builds its own)."""
    import opensmile

    key = (os.getpid(), feature_set)
    if key not in _SMILES:
        _SMILES[key] = opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, feature_set),
                                       feature_level=opensmile.FeatureLevel.Functionals)
    return _SMILES[key]


@register
class OpenSmileEncoder(Encoder):
    """openSMILE functionals per utterance. openSMILE runs one signal per call on one core, so utterances
    are spread over worker processes, each with its own extractor and media store handle."""
    needs_media = True
    Config = OpenSmileConfig

    def __init__(self, name, config: OpenSmileConfig):
        super().__init__(name, config)
        if config.feature_set not in OPENSMILE_SETS:
            raise ParamsError(f"encoders.{name}.feature_set: one of {sorted(OPENSMILE_SETS)}")
        process_smile(config.feature_set)   # fails here, not in a worker, if openSMILE is missing

    @property
    def dim(self) -> int:
        return OPENSMILE_SETS[self.config.feature_set]

    def provenance(self):
        import opensmile

        return {**super().provenance(), "weights": f"opensmile {opensmile.__version__} {self.config.feature_set}",
                "weights_hash": None}

    def functionals(self, path: str, utt_ids: list[str], audio_ok: np.ndarray, sr: int) -> list[tuple]:
        """(features, problem or None) per utterance; runs in a worker process."""
        media, smile = worker_media(path), process_smile(self.config.feature_set)
        out = []
        for u, ok in zip(utt_ids, audio_ok):
            x = media.audio(u) if ok else np.zeros(0, np.float32)
            reason = None if ok else "audio masked at decode"
            if ok:
                reason = unusable_audio(x, sr, self.config.min_seconds, self.config.silence_dbfs)
            feats = np.zeros(self.dim, np.float32)
            if reason is None:
                feats = smile.process_signal(x, sr).to_numpy().reshape(-1).astype(np.float32)
                if not np.isfinite(feats).all():
                    reason, feats = "non-finite openSMILE features", np.zeros(self.dim, np.float32)
            out.append((feats, reason))
        return out

    def encode(self, rows: pd.DataFrame, manifest: Manifest, media: MediaStore):
        sr = int(media.attrs["sample_rate"])
        ids = rows["utt_id"].tolist()
        audio_ok = media.fixed("audio_valid", ids).astype(bool)
        pooled = np.zeros((len(ids), self.dim), np.float32)
        reasons: list[str | None] = [None] * len(ids)

        def run(batch_rows, results):
            for i, (feats, reason) in zip(batch_rows, results):
                pooled[i], reasons[i] = feats, reason

        workers = self.config.workers if self.config.workers >= 0 else min(len(os.sched_getaffinity(0)), 8)
        path = media.path
        batched_with_oom_retry(np.arange(len(ids)), 8, run,
                               prepare=lambda b: self.functionals(path, [ids[i] for i in b], audio_ok[b], sr),
                               workers=min(workers, -(-len(ids) // 8)))
        problems = [masked_problem(r, r.get("audio", ""), reason, "audio")
                    for (_, r), reason in zip(rows.iterrows(), reasons) if reason is not None]
        return {"pooled": pooled, "valid": np.array([r is None for r in reasons], bool)}, problems




@register
class HFAudioEncoder(HiddenLayers, HFEncoder):
    """Self-supervised speech models via transformers (MaTAV: WavLM; TelME's student input: data2vec-audio).

    The utterance's frames are mean-pooled over the model's own frame mask, so padding in a batch never
    changes a feature. `layers` keeps several hidden states, each pooled alike (SUPERB's frozen-upstream
    protocol, arXiv:2105.01051: the downstream head learns their weighted sum); `layer: k` is the older
    spelling of `layers: [k]`."""
    needs_media = True
    Config = HFAudioConfig

    def __init__(self, name, config: HFAudioConfig):
        super().__init__(name, config)
        self.load_model("AutoModel", "AutoFeatureExtractor")
        self.hidden_layers = self.kept_layers()

    def provenance(self):
        return {**super().provenance(), "sample_rate": int(self.processor.sampling_rate)}

    def prepare(self, waves: list[np.ndarray], sr: int) -> dict:
        """The model's processor on a batch of waveforms (normalised, padded, with the attention mask)."""
        return dict(self.processor(waves, sampling_rate=sr, padding=True, return_attention_mask=True,
                                   return_tensors="pt"))

    def forward(self, inputs: dict, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pooled [B, D] ([B, L, D] for several layers) and per-utterance frame sequences of a prepared batch."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        with autocast_context(self.device, self.config.autocast):
            states = self.kept_states(self.model(**inputs, **self.model_kwargs()))
        frames = self.model._get_feature_vector_attention_mask(states[0].shape[1], inputs["attention_mask"])
        frames = frames.to(states[0].dtype)
        pooled = self.stack([(h * frames[..., None]).sum(1) / frames.sum(1, keepdim=True).clamp(min=1)
                             for h in states])
        seqs = [self.stack([h[i, frames[i].bool()] for h in states]).cpu().numpy()
                for i in range(n)] if self.config.return_sequence else []
        return pooled.cpu().numpy(), seqs

    def encode(self, rows: pd.DataFrame, manifest: Manifest, media: MediaStore):
        import torch

        from pipeline.store import ragged

        sr = int(media.attrs["sample_rate"])
        if sr != self.processor.sampling_rate:
            raise ParamsError(f"encoders.{self.name}: the model expects {self.processor.sampling_rate} Hz audio, "
                              f"the media store holds {sr} Hz (set decode.sample_rate)")
        ids = rows["utt_id"].tolist()
        ok = media.fixed("audio_valid", ids).astype(bool)
        waves, problems, valid = [], [], []
        for (_, r), good in zip(rows.iterrows(), ok):
            x = media.audio(r["utt_id"])[: int(self.config.max_seconds * sr)] if good else np.zeros(0, np.float32)
            if not good:
                problems.append(masked_problem(r, r.get("audio", ""), "audio masked at decode", "audio"))
            elif reason := unusable_audio(x, sr, self.config.min_seconds, self.config.silence_dbfs):
                problems.append(masked_problem(r, r.get("audio", ""), reason, "audio"))
                good = False
            waves.append(x if good else np.zeros(int(self.config.min_seconds * sr), np.float32))
            valid.append(bool(good))
        valid = np.array(valid, bool)
        pooled = np.zeros((len(ids), *self.pooled_shape), np.float32)
        seqs = [np.zeros((0, *self.pooled_shape), np.float32)] * len(ids)

        def run(batch_rows, inputs):
            vec, seq = self.forward(inputs, len(batch_rows))
            pooled[batch_rows] = vec
            for k, i in enumerate(batch_rows):
                if seq:
                    seqs[i] = seq[k]

        with torch.inference_mode():
            batched_with_oom_retry(np.argsort([len(w) for w in waves], kind="stable"),
                                   clip_batch_size(self.config.batch_size, self.device), run,
                                   prepare=lambda rows: self.prepare([waves[i] for i in rows], sr),
                                   workers=prep_workers(self.config.prep_workers, self.device),
                                   pin_memory=self.device.type == "cuda")
        pooled[~valid] = 0.0
        arrays = {"pooled": pooled, "valid": valid}
        if self.config.return_sequence:
            arrays.update(ragged(seqs, "seq", np.float32, self.pooled_shape))
        return arrays, problems
