"""Stage finetune_student: fine-tune a student once on a dataset against the teacher store of `distil.teacher`
(TelME's audio and visual students: data2vec-audio / TimeSformer trained with CE + alpha DIST + beta feature KD,
eq. 6-15; heads/telme_students.py), then write its store (data/features/<dataset>/<student>.h5: pooled + logits)
from the best checkpoint (models/<dataset>/<student>/best). The `telme` head's fusion then reads the students'
stores (params `features`). A re-run teacher re-runs its students (this stage depends on its store).

Distributed as finetune_text is (`procs: N`; stages/finetune_text.py)."""
import argparse
import logging
from pathlib import Path

import heads.telme_students  # noqa: F401  (registers the telme_student objective)
from pipeline import distributed, paths
from pipeline.finetune.kinds import build_finetuner
from pipeline.finetune.objectives import build_objective
from pipeline.finetune.store_writer import finetune_to_store
from pipeline.logs import run_stage
from pipeline.manifest import Manifest
from pipeline.params import ParamsError, load_params

log = logging.getLogger(__name__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--params", default=paths.PARAMS)
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.student not in params.distil.students:
        raise ParamsError(f"distil.students: no student '{args.student}'; listed: {params.distil.students}")
    p = params.finetune_entry(args.student)
    if distributed.stage_ranks("stages.finetune_student", argv, p.procs, p.device, f"finetune.{args.student}",
                               f"fine-tune {args.student}") is None:
        return   # it ran as p.procs processes under torchrun
    manifest = Manifest.load(paths.manifest(args.dataset))
    objective = build_objective(p, manifest, f"finetune.{args.student}.objective",
                                teacher_store=paths.features(args.dataset, params.distil.teacher))
    tuner = build_finetuner(manifest, p, paths.checkpoints(args.dataset, args.student), paths.media(args.dataset),
                            objective)
    finetune_to_store(tuner, args.student, Path(paths.features(args.dataset, args.student)), log=log.info)


if __name__ == "__main__":
    run_stage(main)
