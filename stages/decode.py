"""Stage decode: manifest -> media store (data/media/<dataset>.h5) + summary of bad media."""
import argparse
import json
import logging
from pathlib import Path

from pipeline import paths
from pipeline.logs import progress, run_stage
from pipeline.manifest import Manifest
from pipeline.media import decode_dataset
from pipeline.params import load_params
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--params", default=paths.PARAMS)
    args = ap.parse_args(argv)
    params = load_params(args.params)
    manifest = Manifest.load(paths.manifest(args.dataset))
    out = Path(paths.media(args.dataset))
    with progress(total=len(manifest), desc=f"decode {args.dataset}", unit="utt") as bar:
        summary = decode_dataset(manifest, out, params.decode, progress=bar)
    atomic_write_text(paths.summary(out), json.dumps(summary, indent=1))
    log.info(f"{out}: {summary['utterances']} utterances read with {summary['reader']}, masked audio "
          f"{summary['masked_audio']}, masked video {summary['masked_video']}, trimmed {summary['trimmed']}")
    if summary["text_only"]:
        log.info("  text only: no utterance names a media file; the store holds no audio and no frames")
    elif summary["absent_audio"] or summary["absent_video"]:
        log.info(f"  without media (not a problem): audio {summary['absent_audio']}, video {summary['absent_video']}")
    for q in summary["problems"][:20]:
        log.info(f"  {q['action']}: {q['utt_id']}: {q['problem']} ({q['file']})")


if __name__ == "__main__":
    run_stage(main)
