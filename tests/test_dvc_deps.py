"""dvc.yaml lists, for every stage, every project module its command imports: an edit to any of them makes
`dvc status` report the stage as changed (an unlisted module would leave a stale stage "up to date")."""
from pathlib import Path

import yaml
from conftest import REPO, imported_files
def stage_modules(cmd: str) -> list[Path]:
    """The file `python -m X ...` runs; for the `ercflow` package, its __main__ and the command's module
    (the command line imports it by name)."""
    words = cmd.split()
    module = words[words.index("-m") + 1]
    path = REPO.joinpath(*module.split("."))
    if not path.is_dir():
        return [path.with_suffix(".py")]
    from ercflow.cli import COMMANDS

    command = words[words.index("-m") + 2]
    return [path / "__main__.py", REPO.joinpath(*COMMANDS[command][0].split(".")).with_suffix(".py")]


def test_every_stage_lists_every_module_it_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        deps = [REPO / d for d in stage.get("deps", []) if "${" not in d]
        covered = lambda f: any(f == d or d in f.parents for d in deps)  # noqa: E731
        reached = set().union(*(imported_files(f) for f in stage_modules(stage["cmd"])))
        lacking = sorted(str(f.relative_to(REPO)) for f in reached if not covered(f))
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml: stages miss deps on modules they import: {missing}"


def test_the_import_walk_finds_lazy_imports():
    """The walk must see imports inside functions."""
    files = {str(f.relative_to(REPO)) for f in imported_files(REPO / "stages" / "train.py")}
    assert {"heads/matav.py", "heads/mamba.py", "pipeline/store/readers.py", "pipeline/__init__.py"} <= files


def test_a_student_fine_tune_depends_on_telme_alone_among_the_heads():
    """An edit to another head must not re-run a student's fine-tune (hours on a GPU): the stage imports
    heads/telme.py's losses, not the registry of every head."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune_student"]
    reached = {str(f.relative_to(REPO)) for f in imported_files(REPO / "stages" / "finetune_student.py")}
    heads = sorted(f for f in reached if f.startswith("heads/"))
    assert heads == ["heads/__init__.py", "heads/data.py", "heads/layers.py", "heads/telme.py",
                     "heads/telme_students.py"], heads
    assert "heads" not in stage["deps"] and "heads/dialoguetrm.py" not in stage["deps"]
