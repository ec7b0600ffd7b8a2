"""Stage prepare: dataset on disk -> validated manifest (data/manifest/<dataset>/)."""
import argparse
import json
from dataclasses import asdict
from pathlib import Path

from pipeline.datasets import build_manifest
from pipeline.params import load_params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    out = Path(args.out or f"data/manifest/{args.dataset}")
    manifest, problems = build_manifest(args.dataset, load_params(args.params).dataset(args.dataset))
    manifest.save(out)
    (out / "problems.json").write_text(json.dumps([asdict(p) for p in problems], indent=1))
    counts = manifest.rows.groupby("split").size().to_dict()
    print(f"{args.dataset}: {len(manifest)} utterances {counts}, {len(manifest.dialogues())} dialogues -> {out}")
    for p in problems[:20]:
        print(f"  problem: {p}")
    if len(problems) > 20:
        print(f"  ... {len(problems) - 20} more in {out / 'problems.json'}")


if __name__ == "__main__":
    main()
