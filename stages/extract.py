"""Stage extract: run one encoder once over a dataset -> feature store (data/features/<dataset>/<encoder>.h5).

With `encoders.<encoder>.procs: N > 1` the stage runs itself again under torchrun as N processes that share
the store's chunks (pipeline/distributed.py, pipeline/extract.py); `dvc repro` still runs one command."""
import argparse
import json
import logging
from pathlib import Path

from pipeline import distributed, paths
from pipeline.encoders import build_encoder
from pipeline.extract import extract
from pipeline.logs import progress, run_stage
from pipeline.manifest import Manifest
from pipeline.params import ParamsError, load_params
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--params", default=paths.PARAMS)
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.encoder not in params.encoders:
        raise ParamsError(f"encoders: no encoder '{args.encoder}'; defined: {sorted(params.encoders)}")
    config = params.encoder(args.encoder)
    r = distributed.stage_ranks("stages.extract", argv, config.procs, getattr(config, "device", "cpu"),
                                f"encoders.{args.encoder}", f"extract {args.encoder} on {args.dataset}")
    if r is None:   # it ran as config.procs processes under torchrun
        return
    manifest = Manifest.load(paths.manifest(args.dataset))
    encoder = build_encoder(args.encoder, params.encoders[args.encoder])
    out = Path(paths.features(args.dataset, args.encoder))
    desc = f"{args.encoder} {args.dataset}" + (f" [{r}]" if r.distributed else "")
    with progress(total=len(manifest), desc=desc, unit="utt", position=r.rank) as bar:
        summary = extract(manifest, encoder, out, paths.media(args.dataset), args.chunk_size, bar)
    if not r.main:
        return
    atomic_write_text(paths.summary(out), json.dumps(summary, indent=1))
    log.info(f"{out}: {summary['utterances']} utterances, {summary['chunks_computed']} chunk(s) computed now"
             f"{f' by {r.world} processes' if r.distributed else ''}, {summary.get('masked', 0)} masked")


if __name__ == "__main__":
    run_stage(main)
