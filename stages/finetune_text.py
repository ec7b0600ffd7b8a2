"""Stage finetune_text: fine-tune a text teacher once on a dataset, then write its teacher store
(data/features/<dataset>/<teacher>.h5: pooled features + logits) and keep the best checkpoint
(models/<dataset>/<teacher>/best, with the tokenizer and its added speaker tokens; safetensors + JSON,
layout in pipeline/finetune.py).

With `finetune.<teacher>.procs: N > 1` the stage runs itself again under torchrun as N processes training one
DistributedDataParallel model (each step sees batch_size x grad_accum x N utterances; pipeline/finetune.py)."""
import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline import distributed
from pipeline.finetune import build_finetuner, finetune_to_store
from pipeline.logs import run_stage
from pipeline.manifest import Manifest
from pipeline.params import ParamsError, load_params
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)


def start(stage: str, argv, name: str, p) -> distributed.Ranks | None:
    """Under torchrun (or with procs 1): this process's ranks, in the process group, on its device. With
    `procs: N > 1` outside torchrun: the stage runs again as N processes, and None comes back."""
    if p.procs > 1 and not distributed.under_torchrun():
        distributed.relaunch(stage, sys.argv[1:] if argv is None else list(argv), p.procs, f"fine-tune {name}")
        return None
    r = distributed.ranks()
    distributed.join_group(r)
    if not r.main:   # one voice: the other ranks speak only of problems
        for logger in ("pipeline", "stages"):
            logging.getLogger(logger).setLevel(max(logging.getLogger(logger).getEffectiveLevel(), logging.WARNING))
    distributed.bind_device(r, p.device, f"finetune.{name}")
    return r


def finish(r: distributed.Ranks, tuner, name: str, out: Path) -> None:
    summary = finetune_to_store(tuner, name, out, log=log.info)
    if r.main:
        atomic_write_text(out.with_suffix(".summary.json"), json.dumps(summary, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.teacher not in params.finetune:
        raise ParamsError(f"finetune: no teacher '{args.teacher}'; defined: {sorted(params.finetune)}")
    p = params.teacher(args.teacher)
    r = start("stages.finetune_text", argv, args.teacher, p)
    if r is None:
        return
    manifest = Manifest.load(f"data/manifest/{args.dataset}")
    tuner = build_finetuner(manifest, p, f"models/{args.dataset}/{args.teacher}")
    finish(r, tuner, args.teacher, Path(f"data/features/{args.dataset}/{args.teacher}.h5"))


if __name__ == "__main__":
    run_stage(main)
