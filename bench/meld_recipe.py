"""Real MELD transcripts through the CPU recipe (`recipes/meld-text-cpu.yaml`), MELD **dev** only.

In a temp copy of the project, the recipe is applied to params.yaml, each head is trained twice (on the frozen
all-MiniLM-L6-v2 store and on the fine-tuned teacher's store, `features` per head), and `dvc repro` runs it all:
extraction, the teacher's fine-tuning, every head over the recipe's seeds. Then, in this process, a logistic
regression on each store (train -> dev, the linear probe), and the table: dev WF1 mean ± std over the seeds
per head and store, the teacher's own dev WF1 (its classifier, from the store's logits), and the LR probe.
MELD's test split is never read (the repository has no test CSV; selection is on dev).

    python bench/meld_recipe.py                       # ~1.5 h on 2 CPU cores (the teacher's fine-tuning most of it)
    python bench/meld_recipe.py --ctx-pooling mean --ctx-layers last --teacher-grouped   # docs/benchmarks.md's table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from meld_csvs import MELD  # noqa: E402
from scale import make_project  # noqa: E402
from ercflow.recipe import apply_recipe  # noqa: E402

FROZEN, CONTEXT, TEACHER = "text_minilm", "text_minilm_ctx", "teacher_minilm"


GROUPED_TEACHER = {"batch_size": 32, "grad_accum": 1, "sort_micro_batches": False, "group_by_length": True}


def bench_params(seeds: list[int], teacher_epochs: int | None = None, ctx: dict | None = None,
                 teacher_grouped: bool = False) -> tuple[dict, dict[str, tuple[str, str]]]:
    """The recipe over the repository's params (the teacher's epochs and batches and the indi_context store's
    options overridden where given), with each text head on the frozen store and on the teacher's; returns the
    params and {head: (head kind, store)}."""
    params = apply_recipe("meld-text-cpu", yaml.safe_load((REPO / "params.yaml").read_text()))
    if teacher_epochs:
        params["finetune"][TEACHER] = {**params["finetune"][TEACHER], "epochs": teacher_epochs}
    if teacher_grouped:   # the teacher's batches as docs/benchmarks.md's table was measured (length-grouped)
        params["finetune"][TEACHER] = {**params["finetune"][TEACHER], **GROUPED_TEACHER}
    params["encoders"][CONTEXT] = {**params["encoders"][CONTEXT], **(ctx or {})}
    params["trainer"] = {**params["trainer"], "seeds": seeds}
    heads, table = {}, {}
    for name in params["train"]:
        spec = params["heads"][name]
        own = (spec.get("features") or {}).get("text", params["features"]["text"])
        for store in ([own] if own == CONTEXT else [FROZEN, TEACHER]):   # DialogueTRM: its indi_context store
            key = name if own == store else f"{name}@{store}"
            heads[key] = {**spec, "features": {**(spec.get("features") or {}), "text": store}}
            table[key] = (spec["head"], store)
        if own == CONTEXT:   # and on the teacher's store too
            key = f"{name}@{TEACHER}"
            heads[key] = {**spec, "features": {**(spec.get("features") or {}), "text": TEACHER}}
            table[key] = (spec["head"], TEACHER)
    params["heads"] = {**params["heads"], **{k.replace("@", "_on_"): v for k, v in heads.items()}}
    params["train"] = [k.replace("@", "_on_") for k in heads]
    return params, {k.replace("@", "_on_"): v for k, v in table.items()}


def linear_probe(project: Path, store: str) -> float:
    """Dev WF1 of a logistic regression on the store's pooled features, fitted on train."""
    from sklearn.linear_model import LogisticRegression

    from pipeline.manifest import Manifest
    from pipeline.metrics import classification_metrics
    from pipeline.store import FeatureStore

    manifest = Manifest.load(project / "data/manifest/meld")
    y = {s: manifest.split_rows(s)["label"].map(manifest.meta.labels.index).to_numpy() for s in ("train", "dev")}
    with FeatureStore(project / f"data/features/meld/{store}.h5") as fs:
        x = {s: fs.split(manifest, s) for s in ("train", "dev")}
    mu, sd = x["train"].mean(0), x["train"].std(0) + 1e-6
    lr = LogisticRegression(max_iter=2000).fit((x["train"] - mu) / sd, y["train"])
    return classification_metrics(y["dev"], lr.predict((x["dev"] - mu) / sd), manifest.meta.labels)["wf1"]


def teacher_dev_wf1(project: Path) -> float:
    """The fine-tuned teacher's own dev WF1: argmax of the teacher store's logits (its classifier)."""
    from pipeline.manifest import Manifest
    from pipeline.metrics import classification_metrics
    from pipeline.store import FeatureStore

    manifest = Manifest.load(project / "data/manifest/meld")
    dev = manifest.split_rows("dev")
    with FeatureStore(project / f"data/features/meld/{TEACHER}.h5") as fs:
        logits = fs.logits(dev["utt_id"])
    y = dev["label"].map(manifest.meta.labels.index).to_numpy()
    return classification_metrics(y, logits.argmax(1), manifest.meta.labels)["wf1"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv-dir", default=str(MELD), help="a folder with train_sent_emo.csv and dev_sent_emo.csv")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--ctx-pooling", default=None, help="the indi_context store's pooling (default: the recipe's)")
    ap.add_argument("--ctx-layers", default=None, help="its layers: last | all (default: the recipe's)")
    ap.add_argument("--teacher-grouped", action="store_true",
                    help="the teacher's batches length-grouped (batch 32), as docs/benchmarks.md's table was measured")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--keep", help="run in this folder and keep it (a re-run there resumes through dvc)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(args.keep or tmp)
        project.mkdir(parents=True, exist_ok=True)
        if not (project / ".dvc").exists():
            make_project(project)
        ctx = {k: v for k, v in (("pooling", args.ctx_pooling), ("layers", args.ctx_layers)) if v}
        params, table = bench_params([int(s) for s in args.seeds.split(",")], args.teacher_epochs, ctx,
                                     args.teacher_grouped)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        raw = project / "data/raw/meld"
        raw.parent.mkdir(parents=True, exist_ok=True)
        if not raw.exists():
            raw.symlink_to(Path(args.csv_dir).resolve())
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONPATH": str(project), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
        subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, check=True)
        metrics = json.loads((project / "reports/metrics.json").read_text())["meld"]
        probes = {s: linear_probe(project, s) for s in (FROZEN, CONTEXT, TEACHER)}
        teacher = teacher_dev_wf1(project)
        n_seeds = len(params["trainer"]["seeds"])
        teacher_cfg = params["finetune"][TEACHER]
        print(f"\nMELD dev WF1 (x100), {n_seeds} seeds mean ± std; teacher: {teacher_cfg['epochs']} epochs"
              f"{', group_by_length' if teacher_cfg.get('group_by_length') else ''}"
              f"{', sorted micro-batches' if teacher_cfg.get('sort_micro_batches') else ''}; {CONTEXT}: "
              f"{params['encoders'][CONTEXT]['pooling']}, layers {params['encoders'][CONTEXT].get('layers', 'last')}; "
              f"{time.perf_counter() - t0:.0f} s in this run\n")
        print(f"| {'model':34s} | {'features':16s} | dev WF1 | vs LR on the same store |")
        print(f"|{'-' * 36}|{'-' * 18}|---------|-------------------------|")
        for store in (FROZEN, CONTEXT, TEACHER):
            print(f"| {'logistic regression':34s} | {store:16s} | {100 * probes[store]:7.2f} | {'1.00x':>23s} |")
        print(f"| {'fine-tuned teacher (own classifier)':34s} | {TEACHER:16s} | {100 * teacher:7.2f} | "
              f"{teacher / probes[TEACHER]:22.2f}x |")
        for name, (kind, store) in table.items():
            m = metrics[name]
            std = m.get("dev_wf1_std", 0.0) or 0.0
            print(f"| {name + ' (' + kind + ')':34s} | {store:16s} | {100 * m['dev_wf1']:5.2f} ± {100 * std:.2f} | "
                  f"{m['dev_wf1'] / probes[store]:22.2f}x |")


if __name__ == "__main__":
    main()
