"""Stage finetune_student: fine-tune a student once on a dataset against the teacher store of `distil.teacher`
(TelME's audio and visual students: data2vec-audio / TimeSformer trained with CE + alpha DIST + beta feature KD,
eq. 6-15; pipeline/distil.py), then write its store (data/features/<dataset>/<student>.h5: pooled + logits)
from the best checkpoint (models/<dataset>/<student>/best). The `telme` head's fusion then reads the students'
stores (params `features`). A re-run teacher re-runs its students (this stage depends on its store).

Distributed as finetune_text is (`procs: N`; stages/finetune_text.py)."""
import argparse
import logging
from pathlib import Path

from pipeline.distil import TelmeStudent
from pipeline import distributed
from pipeline.finetune import build_finetuner, finetune_to_store
from pipeline.logs import run_stage
from pipeline.manifest import Manifest
from pipeline.params import ParamsError, load_params

log = logging.getLogger(__name__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.student not in params.distil.students:
        raise ParamsError(f"distil.students: no student '{args.student}'; listed: {params.distil.students}")
    p = params.finetuned(args.student)
    if distributed.stage_ranks("stages.finetune_student", argv, p.procs, p.device, f"finetune.{args.student}",
                               f"fine-tune {args.student}") is None:
        return   # it ran as p.procs processes under torchrun
    manifest = Manifest.load(f"data/manifest/{args.dataset}")
    objective = None
    if p.objective == "telme_student":
        objective = TelmeStudent(f"data/features/{args.dataset}/{params.distil.teacher}.h5", manifest, p)
    tuner = build_finetuner(manifest, p, f"models/{args.dataset}/{args.student}", f"data/media/{args.dataset}.h5",
                            objective)
    finetune_to_store(tuner, args.student, Path(f"data/features/{args.dataset}/{args.student}.h5"), log=log.info)


if __name__ == "__main__":
    run_stage(main)
