"""Stage decode: manifest -> media store (data/media/<dataset>.h5) + summary of bad media."""
import argparse
import json
from pathlib import Path

from tqdm import tqdm

from pipeline.manifest import Manifest
from pipeline.media import decode_dataset
from pipeline.params import load_params
from pipeline.store import atomic_write_text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    manifest = Manifest.load(f"data/manifest/{args.dataset}")
    out = Path(f"data/media/{args.dataset}.h5")
    with tqdm(total=len(manifest), desc=f"decode {args.dataset}", unit="utt") as bar:
        summary = decode_dataset(manifest, out, params.decode, progress=bar)
    atomic_write_text(out.with_suffix(".summary.json"), json.dumps(summary, indent=1))
    print(f"{out}: {summary['utterances']} utterances, masked audio {summary['masked_audio']}, "
          f"masked video {summary['masked_video']}, trimmed {summary['trimmed']}")
    for q in summary["problems"][:20]:
        print(f"  {q['action']}: {q['utt_id']}: {q['problem']} ({q['file']})")


if __name__ == "__main__":
    main()
