"""pipeline/paths.py names every path the stages write and every stage; dvc.yaml writes the same templates out.
Here: the two agree (every stage's data deps and outputs, for the same dataset / encoder / teacher / student /
head), and the advice an error gives names the stage that really writes the damaged file (a student's
checkpoint: finetune_student, not finetune_text)."""
import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline import paths
from pipeline.store import FeatureStore, StoreError, what_to_do

REPO = Path(__file__).resolve().parents[1]
CODE = ("pipeline", "heads", "ercflow", "stages")   # deps on code: tests/test_dvc_deps.py checks those
# one run of each stage: its keys' values, and params.yaml values dvc.yaml interpolates
ITEM = {"sample": "sample", "dataset": "meld", "encoder": "wavlm", "teacher": "roberta", "student": "wav_student",
        "head": "telme", "name": {"name": "meld_to_iemocap", "train": "meld", "head": "telme", "test": "iemocap"}}
PARAMS = {"distil.teacher": "roberta", "key": "meld_to_iemocap"}   # `key`: a foreach over a dict's (stage cross)


def substitute(template: str, item) -> str:
    """dvc.yaml's `${item}`, `${item.<key>}` and `${<params key>}` for one run of a stage."""
    def value(m):
        key = m.group(1)
        if key == "item":
            return item
        if key.startswith("item."):
            return item[key[5:]]
        return PARAMS[key]
    return re.sub(r"\$\{([^}]+)\}", value, template)


def entries(section) -> list[str]:
    """The paths of a deps / outs / plots / metrics list (entries are strings or {path: options})."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in section or []]


def mismatches(dvc: dict) -> list[str]:
    """Where dvc.yaml's stages differ from pipeline/paths.py's `STAGES` (empty: they agree)."""
    out = []
    stages = dvc["stages"]
    if set(stages) != set(paths.STAGES):
        out.append(f"stages: dvc.yaml {sorted(stages)} != paths.STAGES {sorted(paths.STAGES)}")
    for name in sorted(set(stages) & set(paths.STAGES)):
        stage, (keys, io) = stages[name], paths.STAGES[name]
        if "foreach" in stage:
            stage, dvc_keys = stage["do"], keys[:1]
            item = ITEM[keys[0]] if keys else None
        else:
            dvc_keys = tuple(stage.get("matrix", {}))
            item = {k: ITEM[k] for k in dvc_keys}
        if tuple(dvc_keys) != keys:
            out.append(f"{name}: runs over {dvc_keys} in dvc.yaml, {keys} in paths.STAGES")
            continue
        want_deps, want_outs = io(dict(item, teacher=PARAMS["distil.teacher"]) if name == paths.FINETUNE_STUDENT
                                  else item)
        deps = [substitute(d, item) for d in entries(stage.get("deps")) if d.split("/")[0] not in CODE]
        outs = [substitute(o, item) for s in ("outs", "plots", "metrics") for o in entries(stage.get(s))]
        if sorted(deps) != sorted(want_deps):
            out.append(f"{name}: data deps {sorted(deps)} in dvc.yaml, {sorted(want_deps)} from paths.py")
        if sorted(outs) != sorted(want_outs):
            out.append(f"{name}: outputs {sorted(outs)} in dvc.yaml, {sorted(want_outs)} from paths.py")
        for flag, value in re.findall(r"--(out|stamp|results) (\S+)", stage["cmd"]):   # paths in the command
            value = substitute(value, item)
            if not any(p == value or p.startswith(value + "/") for p in outs + deps):
                out.append(f"{name}: cmd's --{flag} {value} is none of its deps and outputs")
    return out


def test_dvc_yaml_writes_the_paths_of_paths_py():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert mismatches(dvc) == []


def test_a_path_that_drifted_in_dvc_yaml_is_named():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    drifted = copy.deepcopy(dvc)
    outs = drifted["stages"]["finetune_student"]["outs"]
    outs[0] = {"models/${item.dataset}/${item.student}/best": outs[0][next(iter(outs[0]))]}
    assert [m.split(":")[0] for m in mismatches(drifted)] == ["finetune_student"]
    gone = copy.deepcopy(dvc)
    gone["stages"]["extract"]["deps"].remove("data/media/${item.dataset}.h5")
    assert any(m.startswith("extract: data deps") for m in mismatches(gone))


def test_stage_names_are_dvcs():
    assert paths.stage_name(paths.EXTRACT, "meld", "wavlm") == "extract@meld-wavlm"
    assert paths.stage_name(paths.DECODE, "meld") == "decode@meld"
    assert paths.stage_name(paths.REPORT) == "report"


# -- the advice of an error names the stage that writes the file -----------------------------------------

@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project whose params.yaml lists a student; its checkpoint folders exist (as after a fine-tune)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"teachers": ["roberta"],
                                                          "distil": {"teacher": "roberta", "students": ["wav"]}}))
    for name in ("roberta", "wav"):
        (tmp_path / paths.best_checkpoint("toy", name)).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_damaged_student_checkpoint_names_finetune_student(project):
    from pipeline.finetune.checkpoint import CheckpointError, read_checkpoint_meta

    best = Path(paths.best_checkpoint("toy", "wav"))
    (best / "checkpoint.json").write_text('{"format": "ercflow.audio_checkp')   # cut short
    with pytest.raises(CheckpointError) as e:
        read_checkpoint_meta(best, "hf_audio")
    assert "`dvc repro finetune_student@toy-wav`" in str(e.value), str(e.value)
    assert "`dvc pull models/toy/wav`" in str(e.value) and "finetune_text" not in str(e.value)
    teacher = Path(paths.best_checkpoint("toy", "roberta"))   # the teacher's: still finetune_text
    (teacher / "checkpoint.json").write_text("not json")
    with pytest.raises(CheckpointError, match=r"`dvc repro finetune_text@toy-roberta`"):
        read_checkpoint_meta(teacher, "hf_text")


def test_a_damaged_student_store_names_finetune_student(project):
    store = project / paths.features("toy", "wav")   # an absolute path: the project is read from it
    store.parent.mkdir(parents=True)
    store.write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    with pytest.raises(StoreError, match=r"`dvc repro finetune_student@toy-wav`"):
        FeatureStore(store)
    assert "`dvc repro finetune_text@toy-roberta`" in what_to_do(project / paths.features("toy", "roberta"))
    assert "`dvc repro extract@toy-wavlm`" in what_to_do(project / paths.features("toy", "wavlm"))


def test_without_a_readable_params_yaml_a_fine_tune_is_a_teacher(project):
    (project / "params.yaml").write_text("distil: [unclosed")
    assert "`dvc repro finetune_text@toy-wav`" in what_to_do(paths.best_checkpoint("toy", "wav"))
    assert paths.students(project) == []
    (project / "params.yaml").write_text(json.dumps({"distil": {"students": ["wav", 3]}}))
    assert paths.students(project) == ["wav"]


def test_dvcignore_hides_store_locks_and_none_of_dvcs_own_files():
    """.dvcignore hides a store's writer lock (it can sit inside a tracked folder) and never dvc.yaml, dvc.lock or
    params.yaml: a bare `*.lock` there once hid dvc.lock, and every stage looked as if it had never run."""
    from dvc.ignore import DvcIgnoreFilter
    from dvc.fs import LocalFileSystem

    ignore = DvcIgnoreFilter(LocalFileSystem(), str(REPO))
    for own in ("dvc.lock", "dvc.yaml", "params.yaml", "data/params.checked"):
        assert not ignore.is_ignored_file(str(REPO / own)), own
    assert ignore.is_ignored_file(str(REPO / "data/cross/meld_to_iemocap/media.h5.lock"))
