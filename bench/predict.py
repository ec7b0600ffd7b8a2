"""Speed of `ercflow predict` on the sample: utterances per second, cold (empty work dir: decode + extract +
head) and warm (the same input again: stores reused), for a text-only model and the three-modality fusion.

Builds its own small project first (the sample through `dvc repro`, text_mlp and fusion_mlp only), then
times the command line a user runs, in fresh processes (model loading included, as a user pays it):

    python bench/predict.py                  # 24 dialogues trained, the test dialogues predicted
    python bench/predict.py --dialogues 60
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(cwd: Path, *cmd: str) -> float:
    t = time.perf_counter()
    out = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                              # the stages' `python` must be this interpreter (the one with the dependencies)
                              "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dialogues", type=int, default=24)
    ap.add_argument("--keep", default=None, help="build the project here and keep it")
    args = ap.parse_args()
    proj = Path(args.keep or tempfile.mkdtemp(prefix="ercflow_predict_bench_"))
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (proj / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, proj / f)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["sample"]["dialogues"] = args.dialogues
    params["train"] = ["text_mlp", "fusion_mlp"]
    params["extract"] = ["text_minilm", "audio_egemaps", "visual_c3d"]
    params["teachers"] = []
    params["trainer"].update(epochs=10, seeds=[0])
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"]):
        run(proj, *cmd)
    built = run(proj, sys.executable, "-m", "dvc", "repro")
    rows = pd.read_csv(proj / "data/manifest/sample/manifest.csv", dtype=str, keep_default_na=False)
    talk = rows.loc[rows["split"] == "test", ["utt_id", "dialogue_id", "turn", "speaker", "text", "video", "audio"]]
    talk.to_csv(proj / "talk.csv", index=False)
    n = len(talk)
    print(f"hardware: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.platform()}")
    print(f"project built by dvc repro in {built:.0f} s; predicting {n} utterances "
          f"({talk['dialogue_id'].nunique()} dialogues), each call a fresh `ercflow predict` process\n")
    print(f"{'model':12s} {'cold s':>8s} {'cold utt/s':>11s} {'warm s':>8s} {'warm utt/s':>11s} {'cold/warm':>10s}")
    for head in ("text_mlp", "fusion_mlp"):
        work = proj / f"work_{head}"
        cmd = [sys.executable, "-m", "ercflow", "-q", "predict", "--model", f"models/sample/{head}.safetensors",
               "--input", "talk.csv", "--media-root", "data/raw/sample", "--out", f"pred_{head}.csv",
               "--work-dir", str(work)]
        cold = run(proj, *cmd)
        warm = run(proj, *cmd)
        print(f"{head:12s} {cold:8.1f} {n / cold:11.1f} {warm:8.1f} {n / warm:11.1f} {cold / warm:9.1f}x")
    if not args.keep:
        shutil.rmtree(proj, ignore_errors=True)


if __name__ == "__main__":
    main()
