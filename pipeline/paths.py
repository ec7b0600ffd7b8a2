"""Every path the pipeline writes, and the DVC stage that writes it: one place.

The stages, `ercflow inspect`, `ercflow predict`, the head bundles and every error's advice ("delete X and
re-run `dvc repro <stage>`") take their paths and stage names from here. dvc.yaml writes the same templates
out (DVC reads no Python); `STAGES` below says what each stage reads and writes, and tests/test_paths.py
holds it equal to dvc.yaml.

Paths are strings relative to the project root (the folder of dvc.yaml and params.yaml), as DVC and the
stores record them. `data=` names another data folder laid out the same way (`ercflow inspect` on a copy).
A leaf: imports nothing of the project.
"""
from __future__ import annotations

import os
from pathlib import Path

PARAMS = "params.yaml"
DATA = "data"
MODELS = "models"
RESULTS = "results"
REPORTS = "reports"
PARAMS_CHECKED = f"{DATA}/params.checked"   # stage check's stamp: every other stage depends on it
BEST = "best"                               # the fine-tune checkpoint a store is written from

# -- DVC stage names -------------------------------------------------------------------------------------

CHECK, MAKE_SAMPLE, PREPARE, DECODE, EXTRACT = "check", "make_sample", "prepare", "decode", "extract"
FINETUNE_TEXT, FINETUNE_STUDENT = "finetune_text", "finetune_student"
INPUTS, TRAIN, REPORT = "inputs", "train", "report"
CROSS = "cross"


def stage_name(stage: str, *keys: str) -> str:
    """DVC's name of one run of a `foreach` / `matrix` stage: `extract@meld-wavlm` (the keys in dvc.yaml's
    order: dataset first), or the stage itself without keys."""
    return f"{stage}@{'-'.join(keys)}" if keys else stage


# -- data/ -----------------------------------------------------------------------------------------------

def raw(dataset: str, data: str = DATA) -> str:
    """The bundled sample's clips and transcripts (stage make_sample)."""
    return f"{data}/raw/{dataset}"


def manifest(dataset: str, data: str = DATA) -> str:
    """The validated manifest folder (stage prepare)."""
    return f"{data}/manifest/{dataset}"


def media(dataset: str, data: str = DATA) -> str:
    """The decoded media store (stage decode)."""
    return f"{data}/media/{dataset}.h5"


def features_dir(dataset: str, data: str = DATA) -> str:
    return f"{data}/features/{dataset}"


def features(dataset: str, encoder: str, data: str = DATA) -> str:
    """A feature store: an encoder's (extract), a teacher's (finetune_text) or a student's (finetune_student)."""
    return f"{features_dir(dataset, data)}/{encoder}.h5"


def summary(store: str | Path) -> str:
    """The run summary written beside a store (`<store>.summary.json`)."""
    return str(Path(store).with_suffix(".summary.json"))


def head_inputs(dataset: str, head: str, data: str = DATA) -> str:
    """The stores one head reads, with their fingerprints (stage inputs; stage train depends on it)."""
    return f"{data}/inputs/{dataset}/{head}.json"


def data_folder_of(store: str | Path, media: bool) -> Path:
    """The data folder a store lies in: `<data>/media/<D>.h5` (a media store) or `<data>/features/<D>/<E>.h5`."""
    store = Path(store)
    return store.parent.parent if media else store.parent.parent.parent


# -- models/ ---------------------------------------------------------------------------------------------

def checkpoints(dataset: str, name: str) -> str:
    """A fine-tune's checkpoint folder (`last`, `best`; stages finetune_text and finetune_student)."""
    return f"{MODELS}/{dataset}/{name}"


def best_checkpoint(dataset: str, name: str) -> str:
    return f"{checkpoints(dataset, name)}/{BEST}"


def bundle(dataset: str, head: str) -> str:
    """A trained head's model bundle (stage train; heads/bundle.py)."""
    return f"{MODELS}/{dataset}/{head}.safetensors"


def project_of_bundle(path: str | Path) -> Path:
    """The project a bundle `<project>/models/<D>/<H>.safetensors` lives in (its recorded paths are relative
    to it)."""
    return Path(path).resolve().parents[2]


# -- results/ and reports/ -------------------------------------------------------------------------------

def results(dataset: str, head: str, root: str = RESULTS) -> str:
    """Stage train's folder of metrics, curves, plots and predictions for one head on one dataset."""
    return f"{root}/{dataset}/{head}"


METRICS = "metrics.json"          # in a results folder, and reports/metrics.json (DVC's metrics)
CURVES = "curves.csv"
CONFUSION = "confusion.png"
LAYER_WEIGHTS = "layer_weights.png"
REPORT_MD, REPORT_JSON = "report.md", "report.json"


def predictions(split: str) -> str:
    """A results folder's predictions of one split."""
    return f"predictions_{split}.csv"


def result(dataset: str, head: str, file: str, root: str = RESULTS) -> str:
    return f"{results(dataset, head, root)}/{file}"


RUNS = "runs"                     # in a results folder: one folder per (fold, seed) run, kept to resume
DONE = "done.json"                # in a run folder: the hash of what the run depends on, written last
RUN_BUNDLE = "bundle.safetensors"   # in a run folder: the run's model, while it is the best on dev so far
CROSS_PREDICTIONS = "predictions.csv"   # in a cross-corpus folder: the scored split's predictions, mapped


def runs(dataset: str, head: str, root: str = RESULTS) -> str:
    """Stage train's (fold, seed) run folders of one head on one dataset (persisted: a stopped stage resumes)."""
    return result(dataset, head, RUNS, root)


def run(dataset: str, head: str, fold: str, seed: int, root: str = RESULTS) -> str:
    return f"{runs(dataset, head, root)}/{fold}-s{seed}"


def cross(name: str, root: str = RESULTS) -> str:
    """Stage cross's folder of one cross-corpus run (`cross_corpus.<name>`): metrics and predictions."""
    return f"{root}/{CROSS}/{name}"


def cross_work(name: str, data: str = DATA) -> str:
    """Stage cross's stores (predict's work dir: decoded media and features of the scored dataset)."""
    return f"{data}/{CROSS}/{name}"


def report(file: str, root: str = REPORTS) -> str:
    return f"{root}/{file}"


# -- predict's work dir ----------------------------------------------------------------------------------

def predict_root() -> Path:
    """Where `ercflow predict` keeps its stores by default: $ERCFLOW_CACHE/predict, or ~/.cache/ercflow/predict."""
    return Path(os.environ.get("ERCFLOW_CACHE", Path.home() / ".cache" / "ercflow")) / "predict"


def predict_manifest(work: Path) -> Path:
    return work / "manifest"


def predict_media(work: Path) -> Path:
    return work / "media.h5"


def predict_features(work: Path, encoder: str, config_hash: str) -> Path:
    return work / "features" / f"{encoder}-{config_hash}.h5"


def predict_table(work: Path) -> Path:
    return work / "last_predictions.csv"


# -- what each stage reads and writes (dvc.yaml's data deps and outs; tests/test_paths.py) -----------------

def _check(item):
    return [], [PARAMS_CHECKED]


def _make_sample(item):
    return [PARAMS_CHECKED], [raw(item)]


def _prepare(item):
    return [PARAMS_CHECKED, raw(item)], [manifest(item)]


def _decode(item):
    return [PARAMS_CHECKED, manifest(item)], [media(item), summary(media(item))]


def _extract(item):
    d, e = item["dataset"], item["encoder"]
    return [PARAMS_CHECKED, manifest(d), media(d)], [features(d, e), summary(features(d, e))]


def _finetune_text(item):
    d, t = item["dataset"], item["teacher"]
    return [PARAMS_CHECKED, manifest(d)], [checkpoints(d, t), features(d, t), summary(features(d, t))]


def _finetune_student(item):
    d, s = item["dataset"], item["student"]
    return ([PARAMS_CHECKED, manifest(d), media(d), features(d, item["teacher"])],   # a re-run teacher re-runs it
            [checkpoints(d, s), features(d, s), summary(features(d, s))])


def _inputs(item):
    d, h = item["dataset"], item["head"]
    return [PARAMS_CHECKED, features_dir(d)], [head_inputs(d, h)]


def _train(item):
    d, h = item["dataset"], item["head"]
    files = [predictions("dev"), METRICS, CURVES, CONFUSION, predictions("test")]
    return ([PARAMS_CHECKED, manifest(d), head_inputs(d, h)],
            [bundle(d, h)] + [result(d, h, f) for f in files] + [runs(d, h)])


def _cross(item):
    n, d = item["name"], item["test"]
    return ([PARAMS_CHECKED, bundle(item["train"], item["head"]), manifest(d), raw(d)],
            [cross_work(n), f"{cross(n)}/{CROSS_PREDICTIONS}", f"{cross(n)}/{METRICS}"])


def _report(item):
    return [PARAMS_CHECKED, RESULTS], [report(REPORT_MD), report(REPORT_JSON), report(METRICS)]


# stage -> (the keys of one of its runs, item -> (data deps, outputs)); `finetune_student`'s item also names
# its teacher (params distil.teacher)
STAGES = {
    CHECK: ((), _check),
    MAKE_SAMPLE: (("sample",), _make_sample),
    PREPARE: (("dataset",), _prepare),
    DECODE: (("dataset",), _decode),
    EXTRACT: (("dataset", "encoder"), _extract),
    FINETUNE_TEXT: (("dataset", "teacher"), _finetune_text),
    FINETUNE_STUDENT: (("dataset", "student"), _finetune_student),
    INPUTS: (("dataset", "head"), _inputs),
    TRAIN: (("dataset", "head"), _train),
    REPORT: ((), _report),
    CROSS: (("name",), _cross),   # foreach over params `cross_corpus` (a dict): the name is DVC's ${key}
}


# -- which stage wrote a file (the advice in errors) -----------------------------------------------------

def students(project: str | Path = ".") -> list[str]:
    """`distil.students` of the project's params.yaml: the fine-tunes stage finetune_student writes (dvc.yaml's
    matrix runs over that list). [] when it cannot be read: this only shapes advice."""
    try:
        import yaml

        distil = (yaml.safe_load((Path(project) / PARAMS).read_text()) or {}).get("distil") or {}
        listed = distil.get("students") or []
        return [s for s in listed if isinstance(s, str)] if isinstance(listed, list) else []
    except Exception:   # noqa: BLE001  (no params.yaml, unreadable, not YAML, not a mapping)
        return []


def _finetune_stage(project: Path, dataset: str, name: str) -> str | None:
    """The fine-tune stage that writes models/<dataset>/<name>/ (None: no fine-tune has that name)."""
    if name in students(project):
        return stage_name(FINETUNE_STUDENT, dataset, name)
    if (project / checkpoints(dataset, name)).is_dir():
        return stage_name(FINETUNE_TEXT, dataset, name)
    return None


def writer(path: str | Path) -> tuple[Path, str | None]:
    """(the DVC output holding `path`, the stage run that writes it; None when `path` is no pipeline output).

    Read from the path itself: `<project>/data/features/<D>/<E>.h5` (extract, or the fine-tune whose
    checkpoints are in models/<D>/<E>/), `data/media/<D>.h5` (decode), `models/<D>/<H>.safetensors` (train),
    and anything inside `models/<D>/<N>/` (its fine-tune: the output is that folder). A fine-tune is a student
    when the project's params.yaml lists it in `distil.students`, else a text teacher."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, -1, -1):
        rest = parts[i + 1:]
        if parts[i] == "features" and len(rest) == 2 and rest[1].endswith(".h5"):
            d, e = rest[0], Path(rest[1]).stem
            project = Path(*parts[:max(i - 1, 0)])   # the folder above data/
            return Path(path), _finetune_stage(project, d, e) or stage_name(EXTRACT, d, e)
        if parts[i] == "media" and len(rest) == 1 and rest[0].endswith(".h5"):
            return Path(path), stage_name(DECODE, Path(rest[0]).stem)
        if parts[i] == "models" and len(rest) == 2 and rest[1].endswith(".safetensors"):
            return Path(path), stage_name(TRAIN, rest[0], Path(rest[1]).stem)
        if parts[i] == "models" and len(rest) >= 2:   # a fine-tune checkpoint: the DVC output is its folder
            project = Path(*parts[:i])
            stage = FINETUNE_STUDENT if rest[1] in students(project) else FINETUNE_TEXT
            return Path(*parts[:i + 3]), stage_name(stage, rest[0], rest[1])
    return Path(path), None
