"""Stage train: one head on one dataset's cached features -> model bundle (models/<dataset>/<head>.safetensors:
heads/bundle.py), metrics JSON, curves, confusion plot, dev and test predictions with class probabilities.

The head is trained once per fold of the dataset's protocol (`data.<dataset>.protocol`, pipeline/protocols.py:
`official` is the dataset's own splits, one fold) and per seed (`trainer.seeds`), after the protocol's label map
(IEMOCAP-4: excited -> happy, the rest dropped). Each (fold, seed) run is written to its own folder
(results/<dataset>/<head>/runs/<fold>-s<seed>/, persisted by DVC) and sealed by the hash of what it depends on:
a stopped stage re-run skips the runs already done. The kept bundle is the best run on dev (never test); the
metrics are the mean ± std over every run, with the per-run table kept. The predictions written per split are
the kept seed's, or, cross-validated, each fold's best seed's (every test utterance once: out-of-fold).
A head on a store of several encoder layers also writes the layer weights it learned (metrics.json's
`layer_weights`: the kept run's, by hidden-state index; `layer_weights_per_seed`) and layer_weights.png."""
import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ercflow.check import load_checked_params
from heads.data import CachedDialogues
from heads.fit import fit_head, layer_weights, save_trained_head
from heads.registry import input_normalization
from heads.trainer import selection_score
from pipeline import paths
from pipeline.logs import run_stage
from pipeline.manifest import Manifest
from pipeline.metrics import CATEGORICAL, DIMENSIONAL, mean_and_std, prediction_table, score_table
from pipeline.plots import plot_confusion, plot_layer_weights, plot_true_vs_predicted
from pipeline.protocols import LabelMap, apply_fold, fold_splits
from pipeline.significance import fold_seed_summary, runs_table
from pipeline.store import atomic_write_text, fingerprint

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def code_fingerprint() -> str:
    """A hash of the project's code (heads/, pipeline/, ercflow/ and this stage): a run done by other code is
    not reused (DVC re-runs the stage when its code changes; its runs must then be redone, not skipped). All of
    it, not only what this stage imports: a resume after an unrelated edit retrains, which is safe."""
    h = hashlib.sha256()
    files = [f for p in ("heads", "pipeline", "ercflow") for f in sorted((ROOT / p).rglob("*.py"))]
    for f in files + [Path(__file__).resolve()]:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def table_hash(rows: pd.DataFrame) -> str:
    return hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:16]


TEXT_COLUMNS = ("utt_id", "dialogue_id", "label", "prediction", "fold")


def read_table(path: Path) -> pd.DataFrame:
    """A predictions CSV as written: labels kept as text ('' stays ''), an empty number is NaN, floats are
    read back exactly."""
    columns = pd.read_csv(path, nrows=0).columns
    return pd.read_csv(path, keep_default_na=False, float_precision="round_trip",
                       na_values={c: [""] for c in columns if c not in TEXT_COLUMNS},
                       dtype={c: str for c in columns if c in TEXT_COLUMNS})


def predictions(manifest: Manifest, result, split: str, task: str, n_out: int) -> pd.DataFrame:
    """The prediction table of one split of a run, with each utterance's dialogue (the report bootstraps over
    dialogues)."""
    rows, raw = result.predictions.get(split, (np.zeros(0, np.int64), np.zeros((0, n_out))))
    table = prediction_table(manifest.rows.loc[rows], raw, task, manifest.meta.labels, manifest.meta.dimensions)
    table.insert(1, "dialogue_id", manifest.rows.loc[rows, "dialogue_id"].to_numpy())
    return table


def done(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / paths.DONE).read_text(encoding="utf-8")).get("key") == key
    except (OSError, ValueError):
        return False


def previous_keys(path: Path) -> dict | None:
    """The run keys of the stage's last finished invocation (its metrics.json), or None."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("run_keys")
    except (OSError, ValueError, AttributeError):
        return None


def load_run(folder: Path) -> dict:
    run = json.loads((folder / paths.METRICS).read_text(encoding="utf-8"))
    run["tables"] = {s: read_table(folder / paths.predictions(s)) for s in ("dev", "test")}
    run["curves"] = pd.read_csv(folder / paths.CURVES)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--params", default=paths.PARAMS)
    args = ap.parse_args(argv)
    params = load_checked_params(args.params)   # head options too: it builds a head
    d, h = args.dataset, args.head
    hp = params.head(h)
    where = f"data.{d}.protocol"
    protocol = params.protocol(d)
    manifest = Manifest.load(paths.manifest(d))
    label_map = LabelMap.of(protocol, where)
    if label_map:   # before training and scoring alike: dropped classes leave the data
        manifest = label_map.apply(manifest)
    splits = fold_splits(manifest.rows, protocol, where)
    folds = list(splits.columns)
    cross_validated = protocol.kind != "official"
    stores = params.feature_stores(d, h)
    normalize = input_normalization(hp.head, hp.modalities, hp.options)
    seeds = params.seeds_for(h)
    inputs = Path(paths.head_inputs(d, h))
    common = {"head": dataclasses.asdict(hp), "protocol": dataclasses.asdict(protocol),
              "inputs": inputs.read_text(encoding="utf-8") if inputs.exists() else None,
              "stores": stores, "code": code_fingerprint()}

    runs_dir = Path(paths.runs(d, h))
    wanted = {Path(paths.run(d, h, f, s)).name for f in folds for s in seeds}
    if runs_dir.is_dir():   # runs of folds or seeds no longer asked for
        for stale in [p for p in runs_dir.iterdir() if p.name not in wanted]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    def train(fold_manifest: Manifest, fold: str, seed: int, folder: Path, data, save_bundle) -> tuple[dict, object]:
        """Train one (fold, seed) run into `folder`; its bundle too when `save_bundle(dev score)` says so."""
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        data = data or CachedDialogues(fold_manifest, stores, normalize=normalize)
        trainer = dataclasses.replace(params.trainer_for(h), seed=seed)
        head, result = fit_head(hp, trainer, data, log=log.info)
        run = {"fold": fold, "seed": seed, "metrics": result.metrics, "best_epoch": result.best_epoch,
               "seconds_per_epoch": result.seconds_per_epoch,
               "layer_weights": layer_weights(head, data) if head.mixers else None,
               "tables": {s: predictions(fold_manifest, result, s, hp.task, head.n_out) for s in ("dev", "test")},
               "curves": pd.DataFrame(result.curves)}
        for s, table in run["tables"].items():
            atomic_write_text(folder / paths.predictions(s), table.to_csv(index=False))
        atomic_write_text(folder / paths.CURVES, run["curves"].to_csv(index=False))
        atomic_write_text(folder / paths.METRICS, json.dumps(
            {k: v for k, v in run.items() if k not in ("tables", "curves")}, indent=1))
        if save_bundle(selection_score(hp, result.metrics["dev"])):
            extra = {"dataset": d, "seed": seed, **({"fold": fold, "protocol": where} if cross_validated else {})}
            save_trained_head(folder / paths.RUN_BUNDLE, h, hp, head, result, data, stores, paths.media(d), **extra)
        return run, data

    def key_of(fold_manifest: Manifest, fold: str, seed: int) -> str:
        """The hash of what run (fold, seed) depends on (done.json holds it)."""
        trainer = dataclasses.replace(params.trainer_for(h), seed=seed, seeds=None)   # the other seeds: not this run
        return fingerprint({**common, "trainer": dataclasses.asdict(trainer), "fold": fold,
                            "rows": table_hash(fold_manifest.rows)})

    fold_manifests = {f: apply_fold(manifest, splits, f) if cross_validated else manifest for f in folds}
    keys = {Path(paths.run(d, h, f, s)).name: key_of(fold_manifests[f], f, s) for f in folds for s in seeds}
    # done runs are reused when the stage stopped before its end (resume), not when it had finished with these
    # very runs: DVC then runs it again because it was asked to (`dvc repro -f`) or an output changed
    finished = previous_keys(Path(paths.result(d, h, paths.METRICS))) == keys
    if finished:
        log.info(f"{h} on {d}: the stage had finished with these runs; training them again")
    runs: dict[tuple[str, int], dict] = {}
    best: tuple[float, str, int] | None = None   # (dev score, fold, seed): the kept run
    for fold in folds:
        fold_manifest = fold_manifests[fold]
        data = None   # read only when a run of this fold is to be trained
        for seed in seeds:
            folder = Path(paths.run(d, h, fold, seed))
            key = keys[folder.name]
            if not finished and done(folder, key):
                log.info(f"{h} on {d}: run {folder.name} done before, reused")
                run = load_run(folder)
            else:   # its bundle is kept while no later run beats it on dev
                run, data = train(fold_manifest, fold, seed, folder, data,
                                  lambda score: best is None or score > best[0])
                atomic_write_text(folder / paths.DONE, json.dumps({"key": key}))
            runs[(fold, seed)] = run
            score = selection_score(hp, run["metrics"]["dev"])
            if best is None or score > best[0]:
                best = (score, fold, seed)
    _, kept_fold, kept_seed = best
    kept = runs[(kept_fold, kept_seed)]
    kept_bundle = Path(paths.run(d, h, kept_fold, kept_seed)) / paths.RUN_BUNDLE
    if not kept_bundle.exists():   # its bundle was removed when a run since dropped (a seed left) beat it: again
        log.info(f"{h} on {d}: training run {kept_bundle.parent.name} again for its model")
        train(fold_manifests[kept_fold], kept_fold, kept_seed, kept_bundle.parent, None, lambda score: True)
        atomic_write_text(kept_bundle.parent / paths.DONE, json.dumps({"key": keys[kept_bundle.parent.name]}))
    Path(paths.bundle(d, h)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kept_bundle, paths.bundle(d, h))
    for folder in runs_dir.iterdir():   # the other runs' bundles (a run beaten on dev after a resume)
        if folder.name != kept_bundle.parent.name and (folder / paths.RUN_BUNDLE).exists():
            (folder / paths.RUN_BUNDLE).unlink()

    out = Path(paths.results(d, h))
    out.mkdir(parents=True, exist_ok=True)
    plain = {k: {s: {m: v for m, v in r["metrics"][s].items() if m != "confusion"} for s in r["metrics"]}
             for k, r in runs.items()}
    summary = {"dataset": d, "head": h, "modalities": hp.modalities, "seeds": seeds, "kept_seed": kept_seed,
               "best_epoch": kept["best_epoch"],
               "seconds_per_epoch": round(float(np.mean([r["seconds_per_epoch"] for r in runs.values()])), 3)}
    for split in kept["metrics"]:
        summary[split], summary[f"{split}_std"] = mean_and_std([m[split] for m in plain.values() if split in m])
    if not cross_validated:
        summary["per_seed"] = {s: plain[(f, s)] for f, s in runs}
    given = params.dataset(d).protocol   # a preset's name, or the mapping
    summary["protocol"] = given if isinstance(given, str) else dataclasses.asdict(given)
    summary["folds"], summary["kept_fold"] = folds, kept_fold
    summary["run_keys"] = keys   # what each run depended on (a re-run reuses a run only while it matches)
    summary["per_run"] = [{"fold": f, "seed": s, **plain[(f, s)]} for f, s in runs]
    headline_keys = CATEGORICAL if hp.task == "categorical" else DIMENSIONAL
    tested = [{"fold": f, "seed": s, "metrics": {k: v for k, v in plain[(f, s)].get("test", {}).items()
                                                 if k in headline_keys}} for f, s in runs]
    if all(r["metrics"] for r in tested):
        summary["folds_summary"] = fold_seed_summary(runs_table(tested))
    # each fold's best seed on dev: its predictions stand for the fold (the kept run's, with one fold)
    chosen = {f: max(seeds, key=lambda s: selection_score(hp, runs[(f, s)]["metrics"]["dev"])) for f in folds}
    tables = {}
    for split in ("dev", "test"):
        parts = [runs[(f, chosen[f])]["tables"][split] for f in folds]
        if cross_validated:
            parts = [t.assign(fold=f) for t, f in zip(parts, folds)]
        tables[split] = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        atomic_write_text(out / paths.predictions(split), tables[split].to_csv(index=False))
    if cross_validated and len(tables["test"]):   # the out-of-fold predictions scored as one
        summary["pooled_test"] = score_table(tables["test"], manifest.meta.labels or None,
                                             manifest.meta.dimensions if hp.task != "categorical" else None)
    if kept["layer_weights"]:   # which encoder layers carry the emotion, as the heads learned to weigh them
        summary["layer_weights"] = kept["layer_weights"]
        summary["layer_weights_per_seed"] = ({s: r["layer_weights"] for (_, s), r in runs.items()}
                                             if not cross_validated else
                                             {f"{f}-s{s}": r["layer_weights"] for (f, s), r in runs.items()})
        plot_layer_weights(summary["layer_weights"], out / paths.LAYER_WEIGHTS,
                           f"{h} on {d}: learned layer weights (seed {kept_seed})")
    atomic_write_text(out / paths.METRICS, json.dumps(summary, indent=1))
    atomic_write_text(out / paths.CURVES, kept["curves"].to_csv(index=False))
    # the picture of the test split, or of dev where the dataset has no test rows (MELD from its train and dev
    # CSVs): confusion.png is a declared output, so it is always written. Cross-validated: every fold's test.
    shown = "test" if "test" in kept["metrics"] else "dev"
    title = f"{h} on {d} ({shown}{', out of fold' if cross_validated else ''})"
    if hp.task == "categorical":
        confusion = (summary["pooled_test"]["confusion"] if cross_validated and shown == "test"
                     else kept["metrics"][shown]["confusion"])
        plot_confusion(confusion, manifest.meta.labels, out / paths.CONFUSION, title)
    else:
        dims = manifest.meta.dimensions
        table = tables[shown]
        plot_true_vs_predicted(table[[f"{x}_true" for x in dims]].to_numpy(np.float64),
                               table[dims].to_numpy(np.float64), dims, out / paths.CONFUSION, title)
    test, std = summary.get("test", {}), summary.get("test_std", {})
    log.info(f"{h} on {d} ({len(folds)} fold(s) x {len(seeds)} seed(s)): test " +
             ", ".join(f"{k} {test[k]:.4f} ± {std[k]:.4f}" for k in ("wf1", "ua", "accuracy", "mean_ccc", "mean_r")
                       if k in test))


if __name__ == "__main__":
    run_stage(main)
