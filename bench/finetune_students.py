"""TelME's students fine-tuned (pipeline/finetune/): cost at real size, and what fine-tuning buys on the sample.

1. Real size, random init (no download: the architectures' default configs, which are data2vec-audio-base and
   TimeSformer-base): a few optimizer steps of `AudioFinetuner` / `VideoFinetuner` on synthetic clips of MELD's
   typical length (2-4 s of audio; 8 frames of 224 px), seconds per step after the first, extrapolated to one
   epoch of MELD's train split (9,989 utterances) and labelled so; peak memory (process RSS on a CPU, CUDA
   allocator peak on a GPU, where autocast is bf16). On a CPU the default batch is 2 (TelME's GPU batch: 4 x 4
   accumulated); `--batch-size` changes it.
2. Tiny models on the sample (the tests' sizes): dev WF1 of a linear probe on the frozen store against the
   fine-tuned (`ce`) store, each model on its own modality's planted cue.

    python bench/finetune_students.py                  # both parts, ~10 min on 2 shared CPU cores
    python bench/finetune_students.py --part tiny      # part 2 only (~2 min)

Each real-size model runs in a child process of its own, so the peak RSS is that model's.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MELD_TRAIN = 9989


def sample(root: Path, dialogues: int, seconds: tuple[float, float], size: int, frames: int, p_audio=0.55,
           p_visual=0.55):
    from pipeline.datasets import build_manifest
    from pipeline.datasets.sample import generate
    from pipeline.media import decode_dataset
    from pipeline.params import DatasetParams, DecodeParams, SampleParams

    generate(root / "raw", SampleParams(dialogues=dialogues, min_turns=4, max_turns=6, min_seconds=seconds[0],
                                        max_seconds=seconds[1], fps=8, size=size, seed=2, p_audio=p_audio,
                                        p_visual=p_visual))
    manifest, _ = build_manifest("sample", DatasetParams(adapter="sample", root=str(root / "raw")))
    decode_dataset(manifest, root / "media.h5", DecodeParams(frames=frames, size=size, chunk_size=64))
    return manifest, root / "media.h5"


def real_size(kind: str, steps: int, batch_size: int) -> dict:
    """Seconds per optimizer step (after the first) and peak memory of one model at real size."""
    import pipeline.finetune.loop as ft
    from pipeline.finetune.kinds import build_finetuner
    from pipeline.configs import AudioFinetuneParams, VideoFinetuneParams

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if kind == "audio":
            from transformers import Data2VecAudioConfig, Data2VecAudioModel, Wav2Vec2FeatureExtractor

            torch.manual_seed(0)
            Data2VecAudioModel(Data2VecAudioConfig()).save_pretrained(tmp / "w")
            Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(tmp / "w")
            manifest, media = sample(tmp, 4, (2.0, 4.0), 32, 2)
            p = AudioFinetuneParams(kind="hf_audio", weights=str(tmp / "w"), batch_size=batch_size,
                                    save_every_steps=0, epochs=1)
        else:
            from transformers import TimesformerConfig, TimesformerModel, VideoMAEImageProcessor

            torch.manual_seed(0)
            TimesformerModel(TimesformerConfig()).save_pretrained(tmp / "w")
            VideoMAEImageProcessor().save_pretrained(tmp / "w")
            manifest, media = sample(tmp, 4, (1.0, 2.0), 224, 8)
            p = VideoFinetuneParams(kind="hf_video", weights=str(tmp / "w"), batch_size=batch_size,
                                    save_every_steps=0, epochs=1)
        stamps = []

        class Bar:   # the fine-tune's progress bar, recording when each step ends
            def update(self, n=1):
                stamps.append(time.perf_counter())

            def set_postfix(self, *a, **k):
                pass

            def close(self):
                pass

        ft.progress = lambda **kw: Bar()
        tuner = build_finetuner(manifest, p, tmp / "ckpt", media)
        tuner.save = lambda *a, **k: None   # time the steps, not the checkpoint writes
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            tuner.train(log=lambda *_: None, stop_after_steps=steps)
        except ft.InterruptTraining:
            pass
        per_step = float(np.mean(np.diff(stamps))) if len(stamps) > 1 else float("nan")
        out = {"model": {"audio": "data2vec-audio-base", "visual": "TimeSformer-base"}[kind],
               "params_M": round(sum(w.numel() for w in tuner.model.parameters()) / 1e6, 1),
               "device": str(tuner.device), "threads": torch.get_num_threads(), "batch_size": batch_size, "steps_timed": len(stamps) - 1,
               "s_per_step": round(per_step, 2),
               "s_per_epoch_meld_extrapolated": round(per_step * -(-MELD_TRAIN // batch_size)),
               "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}
        if torch.cuda.is_available():
            out["cuda_peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        return out


def tiny() -> list[dict]:
    """Dev WF1 of a linear probe: frozen store vs the `ce` fine-tune's store, tiny random-init models."""
    from test_students import linear_probe_dev_wf1
    from test_visual_encoders import save_tiny_timesformer

    from pipeline.configs import AudioFinetuneParams, VideoFinetuneParams
    from pipeline.encoders import build_encoder
    from pipeline.extract import extract
    from pipeline.finetune.kinds import build_finetuner
    from pipeline.finetune.store_writer import write_store

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest, media = sample(tmp, 24, (0.4, 0.8), 32, 4, p_audio=0.9, p_visual=0.9)
        from transformers import Data2VecAudioConfig, Data2VecAudioModel, Wav2Vec2FeatureExtractor

        torch.manual_seed(0)
        Data2VecAudioModel(Data2VecAudioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, conv_dim=(16, 16, 16), conv_kernel=(10, 4, 4),
                                               conv_stride=(10, 4, 4), conv_pos_kernel_size=5,
                                               num_conv_pos_embeddings=5, num_conv_pos_embedding_groups=2)
                           ).save_pretrained(tmp / "d2v")
        Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(tmp / "d2v")
        models = {"audio": ("hf_audio", str(tmp / "d2v"), AudioFinetuneParams),
                  "visual": ("hf_video", save_tiny_timesformer(tmp / "tsf"), VideoFinetuneParams)}
        for modality, (kind, weights, P) in models.items():
            frozen = tmp / f"{modality}_frozen.h5"
            extract(manifest, build_encoder("f", {"kind": kind, "weights": weights, "device": "cpu"}), frozen, media)
            p = P(kind=kind, weights=weights, device="cpu", lr=1e-2, warmup_steps=2, epochs=4, batch_size=4,
                  patience=100, dropout=0.0, save_every_steps=0)
            t0 = time.perf_counter()
            tuner = build_finetuner(manifest, p, tmp / f"{modality}_ckpt", media)
            state = tuner.train(log=lambda *_: None)
            write_store(tuner, "ft", tmp / f"{modality}_ft.h5")
            rows.append({"model": f"tiny {kind}", "dev_wf1_frozen_probe": round(linear_probe_dev_wf1(frozen, manifest), 4),
                         "dev_wf1_finetuned_probe": round(linear_probe_dev_wf1(tmp / f"{modality}_ft.h5", manifest), 4),
                         "dev_wf1_finetuned_classifier": round(state["best"], 4),
                         "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["real", "tiny", "both"], default="both")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per real-size model (the first is not timed)")
    ap.add_argument("--batch-size", type=int, default=0, help="0: 2 on a CPU, 4 on a GPU")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a CPU shared "
                    "with other jobs 1 avoids OpenMP spin-waiting")
    ap.add_argument("--child", choices=["audio", "visual"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bs = args.batch_size or (4 if torch.cuda.is_available() else 2)
    if args.child:
        print(json.dumps(real_size(args.child, args.steps, bs)))
        return
    if args.part in ("real", "both"):
        print(f"Real size, random init, {args.steps} steps each (s/epoch EXTRAPOLATED from s/step to MELD train, "
              f"{MELD_TRAIN} utterances):")
        for kind in ("audio", "visual"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(args.steps),
                                  "--batch-size", str(bs), "--threads", str(args.threads)], capture_output=True,
                                 text=True)
            if out.returncode:
                print(f"  {kind}: failed\n{out.stderr[-2000:]}")
                continue
            print("  " + json.dumps(json.loads(out.stdout.strip().splitlines()[-1])))
    if args.part in ("tiny", "both"):
        print("Tiny models on the sample (dev WF1 of a linear probe on each store; dev selection only):")
        for row in tiny():
            print("  " + json.dumps(row))


if __name__ == "__main__":
    main()
