"""How much a clip's pooled feature moves when it is computed in a padded batch rather than alone, for the
speech encoders `hf_audio` runs (random-init real-size models; the architecture decides, not the weights).

    python bench/audio_padding.py

data2vec-audio stacks five positional convolutions, and padding reaches the last frames of a shorter clip
through them; wav2vec2-base / WavLM-base group-normalise their first convolution over the whole padded input.
Prints the cosine between the clip's feature alone and in a batch with a longer clip, the feature pooled over
the model's frame mask as `hf_audio` pools it.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch


def pooled(model, extractor, waves: list[np.ndarray]) -> torch.Tensor:
    x = extractor(waves, sampling_rate=16000, return_tensors="pt", padding=True)
    with torch.inference_mode():
        h = model(**x).last_hidden_state
        frames = model._get_feature_vector_attention_mask(h.shape[1], x["attention_mask"]).float()
    return (h * frames[..., None]).sum(1) / frames.sum(1, keepdim=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="3.0:3.2,3.0:4.0,2.0:6.0", help="clip:longest-in-batch seconds, comma-separated")
    args = ap.parse_args()
    from transformers import (Data2VecAudioConfig, Data2VecAudioModel, Wav2Vec2FeatureExtractor, WavLMConfig,
                              WavLMModel)

    torch.set_num_threads(1)
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True, do_normalize=True)
    models = {"data2vec-audio-base": lambda: Data2VecAudioModel(Data2VecAudioConfig()),
              "wavlm-base (group norm)": lambda: WavLMModel(WavLMConfig()),
              "wavlm-large (layer norm)": lambda: WavLMModel(WavLMConfig(
                  hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True))}
    pairs = [tuple(float(v) for v in p.split(":")) for p in args.pairs.split(",")]
    rng = np.random.default_rng(0)
    waves = {p: (0.1 * rng.standard_normal(int(16000 * p[0])).astype(np.float32),
                 0.1 * rng.standard_normal(int(16000 * p[1])).astype(np.float32)) for p in pairs}
    print(f"{'model':26s} " + " ".join(f"{f'{a:g} s in {b:g} s':>12s}" for a, b in pairs) + "   (cosine to alone)")
    for name, build in models.items():
        torch.manual_seed(0)
        model = build().eval()
        cos = [float(torch.nn.functional.cosine_similarity(pooled(model, extractor, [a])[0],
                                                           pooled(model, extractor, [a, b])[0], 0))
               for a, b in waves.values()]
        print(f"{name:26s} " + " ".join(f"{c:12.6f}" for c in cos), flush=True)


if __name__ == "__main__":
    main()
