"""Stage cross: a trained bundle scored on another dataset (`cross_corpus.<name>`: models/<train>/<head>
on the `split` of dataset `test`), through `ercflow predict`'s code path (ercflow/model.py: the test dataset's
transcripts and media -> decode -> the bundle's encoders -> the head), so it tests what a user runs. Both sides'
classes are mapped to shared ones (pipeline/protocols.py `LabelMap`: `model_map` for the model's classes,
`data_map` for the test data's): the model's probabilities are summed into the shared classes and it predicts
among them only; an utterance whose true class is not shared is not scored. Writes results/cross/<name>/
predictions.csv and metrics.json; the report adds the confidence interval (bootstrap over dialogues)."""
import argparse
import json
import logging
from pathlib import Path

from ercflow.check import load_checked_params
from ercflow.model import load_model
from pipeline import UserError, paths
from pipeline.logs import run_stage
from pipeline.manifest import Manifest
from pipeline.metrics import score_table
from pipeline.protocols import LabelMap
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)
INPUT = ("utt_id", "dialogue_id", "turn", "speaker", "text", "video", "audio", "start", "end")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True, help="an entry of params `cross_corpus`")
    ap.add_argument("--params", default=paths.PARAMS)
    args = ap.parse_args(argv)
    params = load_checked_params(args.params)
    where = f"cross_corpus.{args.name}"
    if args.name not in params.cross_corpus:
        raise UserError(f"{where}: no such entry; defined: {sorted(params.cross_corpus)}")
    c = params.cross_corpus[args.name]
    manifest = Manifest.load(paths.manifest(c.test))
    rows = manifest.rows if c.split == "all" else manifest.rows[manifest.rows["split"] == c.split]
    if rows.empty:
        raise UserError(f"{where}.split: dataset '{c.test}' has no {c.split} rows")
    model = load_model(paths.bundle(c.train, c.head), device=params.trainer.device,
                       work_dir=paths.cross_work(args.name))
    table = model.predict(rows[[col for col in INPUT if col in rows.columns]], media_root=manifest.meta.root,
                          allow_outside_root=params.dataset(c.test).allow_outside_root)
    truth = rows.set_index("utt_id")
    out = {"name": args.name, "train": c.train, "head": c.head, "test": c.test, "split": c.split}
    if model.head.task == "categorical":
        if "label" not in truth.columns:
            raise UserError(f"{where}.test: dataset '{c.test}' has no categorical labels to score "
                            f"{c.train}/{c.head}'s classes against")
        table.insert(2, "label", table["utt_id"].map(truth["label"]).fillna("").to_numpy())
        data_map = LabelMap(c.data_map, c.drop_unlisted, f"{where}.data_map")
        data_map.labels(manifest.meta.labels or sorted(set(truth["label"]) - {""}))   # its keys are the data's classes
        table, shared = LabelMap(c.model_map, c.drop_unlisted, f"{where}.model_map").map_table(
            table, model.labels, truth=data_map if data_map else None)   # no data_map: model_map maps both
        scored = table["label"].isin(shared)
        if not scored.any():
            raise UserError(f"{where}: no utterance of {c.test}'s {c.split} split has a class shared with the model "
                            f"({shared}); map the data's classes with data_map")
        out.update(labels=shared, model_labels=model.labels, metrics=score_table(table, shared))
    else:
        dims = list(model.meta.get("dimensions") or [])
        missing = [x for x in dims if x not in truth.columns]
        if missing:
            raise UserError(f"{where}.test: dataset '{c.test}' has no {missing} values to score against")
        for x in dims:
            table.insert(table.columns.get_loc(x), f"{x}_true", table["utt_id"].map(truth[x]).to_numpy())
        out.update(dimensions=dims, metrics=score_table(table, dims=dims))
    folder = Path(paths.cross(args.name))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / paths.CROSS_PREDICTIONS, table.to_csv(index=False))
    atomic_write_text(folder / paths.METRICS, json.dumps(out, indent=1))
    shown = {k: round(v, 4) for k, v in out["metrics"].items() if isinstance(v, float)}
    log.info(f"{c.train}/{c.head} on {c.test} ({c.split}): {shown}")


if __name__ == "__main__":
    run_stage(main)
