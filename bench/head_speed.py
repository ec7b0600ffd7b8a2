"""Training speed of every head on MELD-size cached features (random tensors; timing only).

13.7k utterances in ~1.4k dialogues, the papers' dims (768 text, 1582 audio, 512 visual, --audio-dim to
change); prints seconds per epoch (train + dev evaluation) for the papers' layer sizes (--config paper)
and/or a small config, against the late-fusion MLP baseline timed in the same run.

    python bench/head_speed.py --config small            # CPU
    python bench/head_speed.py --config paper --device cuda

`--threads 1,0` times each head with each `trainer.threads` setting (0: torch's default, every core), the
ratio against the first; `--busy N` keeps N other processes spinning on the CPU meanwhile, as a machine shared
with other jobs is:

    python bench/head_speed.py --config both --epochs 1 --threads 1,0 --busy 2
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from heads.registry import build_head  # noqa: E402
from heads.data import CachedDialogues  # noqa: E402
from heads.trainer import train_head  # noqa: E402
from pipeline.manifest import Manifest, ManifestMeta  # noqa: E402
from pipeline.params import TrainerParams  # noqa: E402
from pipeline.store import STR, seal  # noqa: E402

CONFIGS = {
    "paper": {"late_fusion": {"hidden": 768},
              "dialoguetrm": {"d_model": 768, "intra_layers": 6, "intra_heads": 12, "inter_layers": 4, "inter_heads": 8},
              "telme": {"paper_defaults": "meld"},
              "matav": {"d_model": 256, "attention_layers": 6, "heads": 8, "queue_size": 4096}},
    "small": {"late_fusion": {"hidden": 128},
              "dialoguetrm": {"d_model": 128, "intra_layers": 1, "intra_heads": 4, "inter_layers": 1, "inter_heads": 4},
              "telme": {"paper_defaults": "meld", "student_hidden": 256},
              "matav": {"d_model": 64, "attention_layers": 2, "heads": 4, "queue_size": 1024}},
}


def meld_size_data(root: Path, dims: dict[str, int], n_dialogues: int = 1432, seed: int = 0) -> CachedDialogues:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.poisson(9.6, n_dialogues), 1, 33)
    rows = []
    for d, n in enumerate(lengths):
        split = "train" if d < 1038 else "dev" if d < 1152 else "test"
        rows += [{"utt_id": f"d{d}u{t}", "dataset": "bench", "split": split, "dialogue_id": f"d{d}", "turn": t,
                  "speaker": f"s{rng.integers(3)}", "text": "x", "label": f"c{rng.integers(7)}"} for t in range(n)]
    m = Manifest(pd.DataFrame(rows), ManifestMeta("bench", ".", [f"c{i}" for i in range(7)]))
    stores = {}
    for mod, d in dims.items():
        path = root / f"{mod}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("utt_id", data=np.array(m.utt_ids, dtype=object), dtype=STR)
            f.create_dataset("pooled", data=rng.standard_normal((len(m), d), dtype=np.float32))
            f.create_dataset("valid", data=np.ones(len(m), bool))
            f.attrs.update(rows=len(m), fingerprint=f"bench-{mod}", code_version="bench")  # what H5Store checks
            seal(f)   # and the checksums it verifies
        stores[mod] = str(path)
    return CachedDialogues(m, stores)


def spin() -> None:
    while True:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["paper", "small", "both"], default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--audio-dim", type=int, default=1582)
    ap.add_argument("--batch-dialogues", type=int, default=16)
    ap.add_argument("--threads", default="1", help="comma-separated trainer.threads settings to time (0: torch's "
                                                    "default)")
    ap.add_argument("--busy", type=int, default=0, help="other processes spinning on the CPU while timing")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for proc in spinners:
        proc.start()
    dims = {"text": 768, "audio": args.audio_dim, "visual": 512}
    with tempfile.TemporaryDirectory() as tmp:
        data = meld_size_data(Path(tmp), dims)
        print(f"device={args.device} utterances={len(data.manifest)} dialogues={len(data.manifest.dialogues())} "
              f"dims={dims} torch={torch.__version__} torch threads by default={torch.get_num_threads()} "
              f"spinning processes={args.busy}")
        for config in (["paper", "small"] if args.config == "both" else [args.config]):
            base = None
            for name, options in CONFIGS[config].items():
                first = None
                for n in threads:
                    torch.manual_seed(0)
                    head = build_head(name, dims, 7, "categorical", options)
                    p = TrainerParams(epochs=args.epochs, patience=100, batch_dialogues=args.batch_dialogues,
                                      device=args.device, lr=1e-4, threads=n)
                    t0 = time.perf_counter()
                    res = train_head(head, data, p, log=lambda *_: None)
                    per_epoch = res.seconds_per_epoch
                    base, first = base or per_epoch, first or per_epoch
                    n_params = sum(x.numel() for x in head.parameters())
                    print(f"{config:6s} {name:12s} threads {n or 'default':>7} {per_epoch:8.2f} s/epoch  "
                          f"({per_epoch / base:5.1f}x late_fusion, {per_epoch / first:5.2f}x threads {threads[0]})  "
                          f"{n_params / 1e6:6.1f} M params  total {time.perf_counter() - t0:6.1f} s", flush=True)
    for proc in spinners:
        proc.terminate()


if __name__ == "__main__":
    main()
