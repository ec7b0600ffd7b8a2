"""`ercflow predict`: a trained model bundle on new conversations (the command; the library is ercflow/model.py).

The input is a transcript table (CSV, TSV or JSONL) with dialogue_id, turn, speaker, text and, for a model
that uses audio or video, `video`/`audio` paths relative to --media-root (optional start/end seconds when one
file holds several utterances). It is decoded and encoded with the decode config and encoders the model's
training stores were made with (a text-only model needs no media), into a work dir reused on the next call
with the same input. The output has one row per utterance: utt_id, dialogue_id, turn, speaker, prediction,
one probability column per class (or the dimensional values), and `problems` (inputs masked, and why).
"""
from __future__ import annotations

import logging
import sys

from pipeline import UserError, paths

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help=f"a model bundle: {paths.bundle('<dataset>', '<head>')}")
    parser.add_argument("--input", required=True, help="the conversations: .csv, .tsv or .jsonl")
    parser.add_argument("--media-root", default=None, help="the folder the table's video/audio paths are relative to")
    parser.add_argument("--out", default="-", help="output CSV (default: standard output)")
    parser.add_argument("--work-dir", default=None,
                        help="where intermediate stores are kept (default: $ERCFLOW_CACHE/predict or ~/.cache/ercflow/predict)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--allow-weights-mismatch", action="store_true",
                        help="go on when an encoder's weights here differ from the ones the model was trained with")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="media paths may leave --media-root (only for a table you trust)")


def run(args) -> int:
    from ercflow.model import load_model
    from pipeline.store import atomic_write_text

    try:
        model = load_model(args.model, device=args.device, work_dir=args.work_dir,
                           allow_weights_mismatch=args.allow_weights_mismatch)
        table = model.predict(args.input, media_root=args.media_root, allow_outside_root=args.allow_outside_root)
    except UserError as e:
        print(f"ercflow predict: {e}", file=sys.stderr)
        return 1
    if args.out == "-":
        table.to_csv(sys.stdout, index=False)
    else:
        atomic_write_text(args.out, table.to_csv(index=False))
        masked = int((table["problems"] != "").sum())
        log.info("%s: %d utterances predicted%s", args.out, len(table),
                 f", {masked} with a masked input (see the problems column)" if masked else "")
    return 0
