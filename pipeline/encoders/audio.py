"""Audio encoders over the media store's 16 kHz mono audio.

- `opensmile`: openSMILE functionals (eGeMAPSv02: 88-d, ComParE_2016: 6373-d), context-free, per utterance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.encoders import Encoder, masked_problem, register, stack_or_empty
from pipeline.manifest import Manifest
from pipeline.params import ParamsError
from pipeline.store import MediaStore

OPENSMILE_SETS = {"eGeMAPSv02": 88, "ComParE_2016": 6373}


@dataclass
class OpenSmileConfig:
    feature_set: str = "eGeMAPSv02"
    min_seconds: float = 0.1      # shorter audio is masked: functionals of a few frames are noise


@register
class OpenSmileEncoder(Encoder):
    kind = "opensmile"
    modality = "audio"
    needs_media = True
    Config = OpenSmileConfig

    def __init__(self, name, config: OpenSmileConfig):
        super().__init__(name, config)
        if config.feature_set not in OPENSMILE_SETS:
            raise ParamsError(f"encoders.{name}.feature_set: one of {sorted(OPENSMILE_SETS)}")
        import opensmile

        self.smile = opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, config.feature_set),
                                     feature_level=opensmile.FeatureLevel.Functionals)

    @property
    def dim(self) -> int:
        return OPENSMILE_SETS[self.config.feature_set]

    def provenance(self):
        import opensmile

        return {**super().provenance(), "weights": f"opensmile {opensmile.__version__} {self.config.feature_set}",
                "weights_hash": None}

    def encode(self, rows: pd.DataFrame, manifest: Manifest, media: MediaStore):
        sr = int(media.attrs["sample_rate"])
        audio_valid = media.fixed("audio_valid", rows["utt_id"])
        vectors, valid, problems = [], [], []
        for (_, r), ok in zip(rows.iterrows(), audio_valid):
            x = media.audio(r["utt_id"]) if ok else np.zeros(0, np.float32)
            reason = None if ok else "audio masked at decode"
            if ok and len(x) < self.config.min_seconds * sr:
                reason = f"audio shorter than {self.config.min_seconds} s"
            feats = np.zeros(self.dim, np.float32)
            if reason is None:
                feats = self.smile.process_signal(x, sr).to_numpy().reshape(-1).astype(np.float32)
                if not np.isfinite(feats).all():
                    reason, feats = "non-finite openSMILE features", np.zeros(self.dim, np.float32)
            if reason is not None:
                problems.append(masked_problem(r, r.get("audio", ""), reason, "audio"))
            vectors.append(feats)
            valid.append(reason is None)
        return {"pooled": stack_or_empty(vectors, self.dim), "valid": np.array(valid, bool)}, problems
