"""Stage finetune_text: fine-tune a text teacher once on a dataset, then write its teacher store
(data/features/<dataset>/<teacher>.h5: pooled features + logits) and keep the best checkpoint
(models/<dataset>/<teacher>/best, with the tokenizer and its added speaker tokens; safetensors + JSON,
layout in pipeline/finetune/checkpoint.py).

With `finetune.<teacher>.procs: N > 1` the stage runs itself again under torchrun as N processes training one
DistributedDataParallel model (each step sees batch_size x grad_accum x N utterances; pipeline/finetune/loop.py)."""
import argparse
import logging
from pathlib import Path

from pipeline import distributed, paths
from pipeline.finetune.kinds import build_finetuner
from pipeline.finetune.store_writer import finetune_to_store
from pipeline.logs import run_stage
from pipeline.manifest import Manifest
from pipeline.params import ParamsError, load_params

log = logging.getLogger(__name__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--params", default=paths.PARAMS)
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.teacher not in params.finetune:
        raise ParamsError(f"finetune: no teacher '{args.teacher}'; defined: {sorted(params.finetune)}")
    p = params.finetune_entry(args.teacher)
    if distributed.stage_ranks("stages.finetune_text", argv, p.procs, p.device, f"finetune.{args.teacher}",
                               f"fine-tune {args.teacher}") is None:
        return   # it ran as p.procs processes under torchrun
    manifest = Manifest.load(paths.manifest(args.dataset))
    tuner = build_finetuner(manifest, p, paths.checkpoints(args.dataset, args.teacher))
    finetune_to_store(tuner, args.teacher, Path(paths.features(args.dataset, args.teacher)), log=log.info)


if __name__ == "__main__":
    run_stage(main)
