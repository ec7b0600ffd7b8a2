"""Decoder-only LLMs on a CPU, tiny random-init models (pipeline/tiny_llm.py; nothing downloaded): extraction
throughput and the cost of a LoRA step against a full fine-tune step, in one process.

- extraction: the `hf_text` encoder on the instruction prompt (left-padded batches, every row's last-token
  feature and its label words' scores), prompt tokens per second over a synthetic dialogue set;
- training: the fine-tune's own model and batches (pipeline/finetune/: TextFinetuner, label-word CE) timed
  per optimizer step (collate, forward, loss, backward, AdamW), with `lora` (r, all linear layers) and without it
  (every weight trained), on the same batches: seconds per step, and the ratio full / LoRA.

On a tiny model the LoRA step saves little (the adapters' extra matmuls are not small beside a 128-wide layer,
and the backward pass still runs through every frozen layer); the saving grows with the width (the optimizer
state and weight gradients scale with d², the adapters' with r·d): see --hidden.
The GPU counterpart at real size is bench/llm_gpu.py.

    python bench/llm_lora_cpu.py --hidden 256 --layers 4 --steps 8
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def dialogues(n: int, seed: int = 0):
    """A manifest of `n` synthetic dialogues (the sample's sentences and speakers, 4-10 turns each)."""
    from pipeline.datasets.sample import EMOTION_TEXT, FILLER_TEXT, LABELS, SLOTS, SPEAKER_NAMES
    from pipeline.manifest import Manifest, ManifestMeta

    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n):
        split = "train" if d < 0.7 * n else "dev" if d < 0.85 * n else "test"
        for t in range(int(rng.integers(4, 11))):
            label = LABELS[int(rng.integers(len(LABELS)))]
            pool = EMOTION_TEXT[label] if rng.random() < 0.6 else FILLER_TEXT
            text = pool[int(rng.integers(len(pool)))].format(**{k: v[0] for k, v in SLOTS.items()})
            rows.append({"utt_id": f"d{d}_u{t}", "dataset": "bench", "split": split, "dialogue_id": f"d{d}",
                         "turn": t, "speaker": SPEAKER_NAMES[int(rng.integers(3))], "text": text, "label": label})
    return Manifest(pd.DataFrame(rows), ManifestMeta(dataset="bench", root=".", labels=list(LABELS)))


def extraction(weights: str, manifest, batch: int, max_length: int) -> dict:
    from pipeline.encoders import build_encoder

    enc = build_encoder("llm", {"kind": "hf_text", "weights": weights, "device": "cpu", "pooling": "last",
                                "input_format": "instruction", "context_window": 5, "max_length": max_length,
                                "batch_size": batch})
    enc.encode(manifest.rows.iloc[:batch], manifest)   # warm-up (and the prompts built once)
    tokens = sum(len(e["input_ids"]) for e in enc.instruction_tokens(np.arange(len(manifest))))
    t0 = time.perf_counter()
    arrays, _ = enc.encode(manifest.rows, manifest)
    seconds = time.perf_counter() - t0
    assert np.isfinite(arrays["logits"]).all()
    return {"utterances": len(manifest), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def step_seconds(weights: str, manifest, lora: dict | None, steps: int, batch: int, max_length: int,
                 ckpt: Path) -> dict:
    """Mean seconds per optimizer step of the fine-tune's model on its first `steps` batches (after one warm-up)."""
    from pipeline.configs import TextFinetuneParams
    from pipeline.finetune.kinds import TextFinetuner
    from pipeline.params import from_dict

    p = from_dict(TextFinetuneParams, dict(weights=weights, input_format="instruction", pooling="last",
                                           context_window=5, max_length=max_length, batch_size=batch, device="cpu",
                                           dropout=0.0, lora=lora), "bench")
    tuner = TextFinetuner(manifest, p, ckpt)
    model = tuner.model.train()
    trainable = [w for w in model.parameters() if w.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    y = torch.from_numpy(np.array(tuner.y, np.int64))
    batches = tuner.epoch_batches(0)
    batches = (batches * (steps + 1))[:steps + 1]

    def step(rows):
        _, logits = model(tuner.collate(rows))
        tuner.objective.loss(rows, None, logits, y[rows], None).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])
    t0 = time.perf_counter()
    for rows in batches[1:]:
        step(rows)
    return {"seconds_per_step": (time.perf_counter() - t0) / steps,
            "trained_parameters": sum(w.numel() for w in trainable),
            "parameters": sum(w.numel() for w in model.parameters())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llama", choices=["llama", "qwen2"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dialogues", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.tiny_llm import save_tiny_llm

    manifest = dialogues(args.dialogues)
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_tiny_llm(Path(tmp) / "llm", args.family, hidden_size=args.hidden, layers=args.layers)
        ext = extraction(weights, manifest, args.batch, args.max_length)
        lora = step_seconds(weights, manifest, {"r": args.r, "alpha": 2 * args.r, "dropout": 0.0}, args.steps,
                            args.batch, args.max_length, Path(tmp) / "lora")
        full = step_seconds(weights, manifest, None, args.steps, args.batch, args.max_length, Path(tmp) / "full")
    ratio = full["seconds_per_step"] / lora["seconds_per_step"]
    print(f"tiny {args.family}: hidden {args.hidden}, {args.layers} layers, {torch.get_num_threads()} threads, "
          f"{ext['utterances']} utterances ({ext['tokens']} prompt tokens)")
    print(f"extraction  {ext['tokens_per_s']:10.0f} tokens/s  ({ext['seconds']:.2f} s)")
    print(f"step LoRA   {lora['seconds_per_step'] * 1000:10.1f} ms     r {args.r}: {lora['trained_parameters']:,} of "
          f"{lora['parameters']:,} parameters trained")
    print(f"step full   {full['seconds_per_step'] * 1000:10.1f} ms     {full['trained_parameters']:,} trained")
    print(f"full / LoRA {ratio:10.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "extraction": ext, "lora": lora, "full": full,
                                               "full_over_lora": ratio}, indent=1))


if __name__ == "__main__":
    main()
