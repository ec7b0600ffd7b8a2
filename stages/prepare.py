"""Stage prepare: dataset on disk -> validated manifest (data/manifest/<dataset>/)."""
import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from pipeline import paths
from pipeline.datasets import build_manifest
from pipeline.logs import run_stage
from pipeline.params import load_params

log = logging.getLogger(__name__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--params", default=paths.PARAMS)
    args = ap.parse_args(argv)
    params = load_params(args.params)
    out = Path(args.out or paths.manifest(args.dataset))
    manifest, problems = build_manifest(args.dataset, params.dataset(args.dataset))
    manifest.save(out)
    (out / "problems.json").write_text(json.dumps([asdict(p) for p in problems], indent=1))
    counts = manifest.rows.groupby("split").size().to_dict()
    log.info(f"{args.dataset}: {len(manifest)} utterances {counts}, {len(manifest.dialogues())} dialogues -> {out}")
    files = {rel for col in ("video", "audio") if col in manifest.rows for rel in manifest.rows[col] if rel}
    if not files:
        log.info("  text only: no utterance names a media file (decode writes a store without audio or frames)")
    for p in problems[:20]:
        log.info(f"  problem: {p}")
    if len(problems) > 20:
        log.info(f"  ... {len(problems) - 20} more in {out / 'problems.json'}")
    if files and len({p.file for p in problems}) == len(files):
        log.info(f"  no media file was found under {manifest.meta.root}: for the transcripts alone, leave out "
              f"data.{args.dataset}.root (MELD: give csv_dir)")


if __name__ == "__main__":
    run_stage(main)
