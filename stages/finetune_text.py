"""Stage finetune_text: fine-tune a text teacher once on a dataset, then write its teacher store
(data/features/<dataset>/<teacher>.h5: pooled features + logits) and keep the best checkpoint
(models/<dataset>/<teacher>/best, with the tokenizer and its added speaker tokens; safetensors + JSON,
layout in pipeline/finetune.py)."""
import argparse
import json
import logging
from pathlib import Path

from pipeline.finetune import FinetuneParams, TextFinetuner, write_teacher_store
from pipeline.logs import run_stage
from pipeline.manifest import Manifest
from pipeline.params import ParamsError, from_dict, load_params
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    raw = load_params(args.params).finetune
    if args.teacher not in raw:
        raise ParamsError(f"finetune: no teacher '{args.teacher}'; defined: {sorted(raw)}")
    p = from_dict(FinetuneParams, raw[args.teacher], f"finetune.{args.teacher}")
    manifest = Manifest.load(f"data/manifest/{args.dataset}")
    tuner = TextFinetuner(manifest, p, f"models/{args.dataset}/{args.teacher}")
    state = tuner.train(log=log.info)
    out = Path(f"data/features/{args.dataset}/{args.teacher}.h5")
    summary = write_teacher_store(tuner, args.teacher, out)
    dev = tuner.evaluate("dev")
    report = {"best_epoch": state["best_epoch"], "dev_wf1": dev["wf1"], "dev_accuracy": dev["accuracy"],
              "steps": state["step"], "train_seconds": round(state.get("seconds", 0.0), 1),
              "store": str(out), "history": state["history"]}
    atomic_write_text(out.with_suffix(".summary.json"), json.dumps({**summary, "finetune": report}, indent=1))
    log.info(f"{args.teacher} on {args.dataset}: best epoch {state['best_epoch']}, dev WF1 {dev['wf1']:.4f} -> {out}")


if __name__ == "__main__":
    run_stage(main)
