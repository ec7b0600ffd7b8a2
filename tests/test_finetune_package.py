"""The fine-tune package (pipeline/finetune/): one idea per file, each importing only the files above it and
nothing of heads/; its kinds and objectives are registries (pipeline/registry.py), TelME's student objective
registered from heads/telme_students.py, so a student fine-tune without that import is a clear UnknownName."""
import ast
import graphlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pipeline.configs import FINETUNE_CONFIGS
from pipeline.finetune.kinds import FINETUNERS
from pipeline.finetune.objectives import CrossEntropy, build_objective
from pipeline.params import ParamsError
from pipeline.registry import UnknownName
from conftest import imported_files

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline" / "finetune"
# top to bottom: a file may import those above it only
ORDER = ["batches", "models", "lora", "llm", "objectives", "checkpoint", "loop", "kinds", "store_writer"]


def finetune_imports(path: Path) -> set[str]:
    """The pipeline.finetune modules `path` imports (anywhere in the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline.finetune."):
            out.add(node.module.split(".")[2])
    return out


def test_each_file_imports_only_the_files_above_it():
    """ORDER's files import none of ORDER below them; with the package's other files (LoRA, LLMs, live
    metrics, ...) they form no import cycle."""
    files = {f.stem: f for f in PACKAGE.glob("*.py") if f.stem != "__init__"}
    assert set(ORDER) <= set(files)
    for i, name in enumerate(ORDER):
        below = finetune_imports(files[name]) & set(ORDER[i:])
        assert not below, f"pipeline/finetune/{name}.py imports {below}, which are not above it"
    graph = {name: finetune_imports(f) for name, f in files.items()}
    graphlib.TopologicalSorter(graph).static_order()   # CycleError names the cycle


def test_the_package_imports_nothing_of_heads():
    reached = set().union(*(imported_files(f) for f in PACKAGE.glob("*.py")))
    assert not sorted(str(f.relative_to(REPO)) for f in reached if f.is_relative_to(REPO / "heads"))


def test_every_fine_tune_kind_has_one_finetuner_of_its_modality():
    assert FINETUNERS.names() == FINETUNE_CONFIGS.names()
    for kind, cls in FINETUNERS.items():
        assert cls.kind == kind and cls.modality == FINETUNE_CONFIGS[kind].modality


def test_ce_is_built_from_params_and_an_unknown_objective_names_its_key():
    assert isinstance(build_objective(types.SimpleNamespace(objective="ce"), None, "finetune.t.objective"),
                      CrossEntropy)
    with pytest.raises(UnknownName, match=r"^finetune\.s\.objective: unknown fine-tune objective 'kd'; known: ce"):
        build_objective(types.SimpleNamespace(objective="kd"), None, "finetune.s.objective")


def test_telme_student_is_registered_by_heads_telme_students_only():
    """In a fresh process: without the import the objective is unknown (named, with its key); with it, it is
    TelmeStudent, which needs the teacher store."""
    script = """
import types
from pipeline.finetune.objectives import OBJECTIVES, build_objective
from pipeline.params import ParamsError
from pipeline.registry import UnknownName
p = types.SimpleNamespace(objective="telme_student")
try:
    build_objective(p, None, "finetune.audio_student.objective", teacher_store="t.h5")
except UnknownName as e:
    print("before:", e)
import heads.telme_students
print("after:", OBJECTIVES.get("telme_student").__name__)
try:
    build_objective(p, None, "finetune.audio_student.objective")
except ParamsError as e:
    print("no store:", e)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert ("before: finetune.audio_student.objective: unknown fine-tune objective 'telme_student'; known: ce\n"
            in out), out
    assert "after: TelmeStudent\n" in out and "no store: objective telme_student: no teacher store" in out, out


def test_a_telme_student_without_a_teacher_store_is_a_params_error():
    from heads.telme_students import TelmeStudent

    with pytest.raises(ParamsError, match="distil.teacher"):
        TelmeStudent.from_params(types.SimpleNamespace(objective="telme_student"), None)
