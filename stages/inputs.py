"""Stage inputs: the feature stores one head reads on one dataset -> data/inputs/<dataset>/<head>.json (each
store's path, fingerprint and row count).

DVC cannot list a computed set of files as one stage's deps, so the train stage depends on this small file
instead of on the whole features folder: re-extracting or adding a store re-runs every `inputs` stage (a
second each), but only the heads whose file changed are trained again."""
import argparse
import json
import logging
from pathlib import Path

from pipeline import paths
from pipeline.logs import run_stage
from pipeline.params import load_params
from pipeline.store import FeatureStore, atomic_write_text

log = logging.getLogger(__name__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--params", default=paths.PARAMS)
    args = ap.parse_args(argv)
    stores = load_params(args.params).feature_stores(args.dataset, args.head)
    inputs = {}
    for modality, path in stores.items():
        with FeatureStore(path) as store:
            inputs[modality] = {"store": path, "fingerprint": store.attrs.get("fingerprint"),
                                "rows": int(store.attrs["rows"])}
    out = Path(paths.head_inputs(args.dataset, args.head))
    atomic_write_text(out, json.dumps(inputs, indent=1, sort_keys=True) + "\n")
    log.info("%s: %s", out, ", ".join(f"{m} <- {v['store']}" for m, v in inputs.items()))


if __name__ == "__main__":
    run_stage(main)
