"""Stage make_sample: write the bundled synthetic dataset (clips + transcripts) from params `sample`."""
import argparse
import logging
import shutil
from pathlib import Path

from pipeline import paths
from pipeline.datasets.sample import generate
from pipeline.logs import run_stage
from pipeline.params import load_params

log = logging.getLogger(__name__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=paths.raw("sample"))
    ap.add_argument("--params", default=paths.PARAMS)
    args = ap.parse_args(argv)
    params = load_params(args.params)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    path = generate(out, params.sample)
    log.info(f"sample written: {path}")
    if params.sample.tiny_llm:
        from pipeline.tiny_llm import save_tiny_llm

        log.info(f"tiny LLM written: {save_tiny_llm(out / 'tiny_llm')}")


if __name__ == "__main__":
    run_stage(main)
