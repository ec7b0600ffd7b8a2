"""params.yaml is validated up front: `ercflow check`, the stages' `load_checked_params`, the JSON Schema."""
import copy
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ercflow import cli
from ercflow.check import check_params, head_options, load_checked_params
from ercflow.schema import SCHEMA_FILE, schema_text
from pipeline.logs import setup_logging
from pipeline.params import ParamsError, ParamsFileError, from_dict, load_params, validate_params
from conftest import BASE

REPO = Path(__file__).resolve().parents[1]


def edit(path: str, value=None, delete=False):
    """A mutation of the params dict: set (or delete) the key at dotted `path`."""
    def apply(raw):
        *parents, last = path.split(".")
        node = raw
        for k in parents:
            node = node[k]
        if delete:
            del node[last]
        else:
            node[last] = value
    return apply


def problems_of(*mutations) -> list[str]:
    raw = copy.deepcopy(BASE)
    for m in mutations:
        m(raw)
    return validate_params(raw, head_options())[1]


# (id, mutation, text the one reported problem must contain: the params path first, then what is wrong)
BAD = [
    ("option typo", edit("heads.fusion_mlp.options.hiden", 64),
     "heads.fusion_mlp.options: unknown option 'hiden' (known: dropout, hidden, normalize)"),
    ("telme students", edit("heads.telme.options.students", "mlps"), "heads.telme.options.students: 'mlps' is not one of"),
    ("telme fusion", edit("heads.telme.options.fusion", "sum"), "heads.telme.options.fusion: 'sum' is not one of"),
    ("dialoguetrm fusion", edit("heads.dialoguetrm.options.fusion", "gated"),
     "heads.dialoguetrm.options.fusion: 'gated' is not one of"),
    ("task typo", edit("heads.text_mlp.task", "categorial"), "heads.text_mlp.task: 'categorial' is not one of"),
    ("epochs: ten", edit("trainer.epochs", "ten"), "trainer.epochs: input should be a valid integer"),
    ("repeated seeds", edit("trainer.seeds", [0, 1, 0]), "trainer: seeds must differ"),
    ("sorted micro-batches, no accumulation", edit("finetune.teacher_minilm.sort_micro_batches", True),
     "finetune.teacher_minilm: sort_micro_batches sorts a step's rows into its grad_accum micro-batches"),
    ("sample not generated", edit("samples", []), "data.sample: its root data/raw/sample is written by make_sample"),
    ("negative lr", edit("trainer.lr", -1e-3), "trainer.lr: input should be greater than 0"),
    ("negative lr override", edit("heads.telme.trainer", {"lr": -1}), "heads.telme.trainer.lr: input should be greater"),
    ("trainer override typo", edit("heads.telme.trainer", {"lrr": 1e-4}), "heads.telme.trainer: unknown key 'lrr'"),
    ("head dropout 1.5", edit("heads.fusion_mlp.options.dropout", 1.5),
     "heads.fusion_mlp.options.dropout: input should be less than 1"),
    ("teacher dropout 1.5", edit("finetune.teacher_minilm.dropout", 1.5), "finetune.teacher_minilm.dropout:"),
    ("unknown section", edit("trainers", {"lr": 1}), "trainers: unknown top-level section"),
    ("unknown decode key", edit("decode.fps", 12), "decode: unknown key 'fps'"),
    ("bad long_clip", edit("decode.long_clip", "cut"), "decode.long_clip: 'cut' is not one of 'trim' or 'mask'"),
    ("bad on_bad_media", edit("decode.on_bad_media", "skip"), "decode.on_bad_media: 'skip' is not one of"),
    ("bad reader", edit("decode.reader", "ffmpeg"), "decode.reader: 'ffmpeg' is not one of"),
    ("frames 0", edit("decode.frames", 0), "decode.frames: input should be greater than 0"),
    ("teacher not in teachers", edit("teachers", []), "heads.telme.features.text: 'teacher_minilm' is not extracted or "
     "fine-tuned (not in extract: "),
    ("undefined teacher", edit("heads.telme.features", {"text": "teacher_x"}),
     "heads.telme.features.text: 'teacher_x' is not extracted or fine-tuned"),
    ("features: unlisted encoder", lambda r: r["extract"].remove("visual_c3d"),
     "features.visual: 'visual_c3d' is not extracted or fine-tuned"),
    ("features: undefined encoder (untrained head)",
     lambda r: (r["heads"].update(extra_head={"head": "late_fusion", "features": {"audio": "wavlm"}})),
     "heads.extra_head.features.audio: 'wavlm' is neither an encoder nor a teacher"),
    ("wrong modality", edit("features.audio", "text_minilm"),
     "features.audio: 'text_minilm' is a text encoder (hf_text), not audio"),
    ("teacher as audio", edit("heads.telme.features", {"audio": "teacher_minilm", "text": "teacher_minilm"}),
     "heads.telme.features.audio: 'teacher_minilm' is a text teacher (finetune), not audio"),
    ("bad pooling", edit("encoders.text_minilm.pooling", "max"), "encoders.text_minilm.pooling: 'max' is not one of"),
    ("mask pooling without prompt", edit("encoders.text_minilm.pooling", "mask"),
     "encoders.text_minilm.pooling: 'mask' pools at the prompt's <mask> token"),
    ("target_mean without context", edit("encoders.text_minilm.pooling", "target_mean"),
     "encoders.text_minilm.pooling: 'target_mean' averages the target utterance's tokens"),
    ("prompt pooled by mean", lambda r: r["encoders"]["text_minilm"].update(input_format="prompt", pooling="mean"),
     "encoders.text_minilm.pooling: input_format 'prompt' is pooled at its <mask> token"),
    ("bad quantize", edit("encoders.text_minilm.quantize", "int4"), "encoders.text_minilm.quantize: 'int4' is not one of"),
    ("bad encoder key", edit("encoders.visual_c3d.widht", 16), "encoders.visual_c3d: unknown key 'widht'"),
    ("unknown encoder kind", edit("encoders.audio_egemaps.kind", "smile"),
     "encoders.audio_egemaps.kind: unknown kind 'smile' (known: "),
    ("encoder without kind", edit("encoders.audio_egemaps.kind", delete=True), "encoders.audio_egemaps.kind: missing"),
    ("bad feature_set", edit("encoders.audio_egemaps.feature_set", "eGeMAPS"), "encoders.audio_egemaps.feature_set:"),
    ("bad device", edit("trainer.device", "gpu"), "trainer.device: 'gpu' is not valid (auto | cpu | cuda | cuda:N)"),
    ("bad encoder device", edit("encoders.visual_c3d.device", "cuda:x"), "encoders.visual_c3d.device: 'cuda:x'"),
    ("unknown adapter", edit("data.meld.adapter", "meld2"), "data.meld.adapter: 'meld2' is not one of"),
    ("adapter without root", edit("data.meld.root", delete=True), "data.meld.root: missing (the meld adapter needs `root`, or `csv_dir` alone"),
    ("iemocap without root", edit("data.iemocap.root", delete=True),
     "data.iemocap.root: missing (required by the iemocap adapter)"),
    ("generic without manifest", edit("data.custom", {"adapter": "generic"}), "data.custom.manifest: missing"),
    ("dataset without data", edit("datasets", ["sample", "mosei"]), "datasets[1]: 'mosei' has no entry in data"),
    ("extract without encoder", lambda r: r["extract"].append("wavlm"), "'wavlm' has no entry in encoders"),
    ("teacher without finetune", edit("teachers", ["teacher_minilm", "teacher_roberta"]),
     "teachers[1]: 'teacher_roberta' has no entry in finetune"),
    ("train lists an undefined head", edit("train", ["fusion_mlp", "fusion_mlp2"]),
     "train[1]: 'fusion_mlp2' has no entry in heads"),
    ("listed twice", edit("train", ["fusion_mlp", "fusion_mlp"]), "train[1]: 'fusion_mlp' is listed twice"),
    ("unknown paper_defaults", edit("heads.telme.options.paper_defaults", "mosei"),
     "heads.telme.options.paper_defaults: 'mosei' is not one of 'meld', 'iemocap', 'meld_table' or 'iemocap_table'"),
    ("paper_defaults on a head without any", edit("heads.fusion_mlp.options.paper_defaults", "meld"),
     "heads.fusion_mlp.options: unknown option 'paper_defaults'"),
    ("unknown head", edit("heads.matav.head", "mamba"), "heads.matav.head: unknown head 'mamba' (known: "),
    ("option of the wrong type", edit("heads.matav.options.mamba", "maybe"), "heads.matav.options.mamba: input should be"),
    ("heads do not divide d_model", edit("heads.matav.options.heads", 5),
     "heads.matav.options: d_model (64) is not divisible by heads (5)"),
    ("bad modality", edit("heads.text_mlp.modalities", ["txt"]), "heads.text_mlp.modalities[0]: 'txt' is not one of"),
    ("no store for a modality", edit("features", {"text": "text_minilm"}),
     "heads.fusion_mlp.modalities: no store for 'audio' (nor for heads "),
    ("bad name", edit("data.my data", {"adapter": "sample", "root": "x"}), "data.my data: 'my data' is not a valid name"),
    ("probability above 1", edit("sample.p_text", 1.5), "sample.p_text: input should be less than or equal to 1"),
    ("max below min", edit("sample.max_turns", 2), "sample.max_turns: 2 is below sample.min_turns"),
    ("finetune typo", edit("finetune.teacher_minilm.epoch", 3), "finetune.teacher_minilm: unknown key 'epoch'"),
    ("finetune lr", edit("finetune.teacher_minilm.lr", 0), "finetune.teacher_minilm.lr: input should be greater than 0"),
    ("section of the wrong type", edit("decode", [1]), "decode: input should be a dictionary"),
]


@pytest.mark.parametrize("mutation,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_each_mistake_is_reported_with_its_params_path(mutation, expected):
    problems = problems_of(mutation)
    assert any(p.startswith(expected) or expected in p for p in problems), problems
    assert all(re.match(r"^[\w .\-\[\]]+: ", p) for p in problems), problems   # each starts with its path
    assert len(problems) <= 2, problems   # one mistake, one message (a bad name is also an unlisted one, ...)


@pytest.mark.parametrize("fmt", ["indi_context", "prompt"])
def test_target_mean_pooling_of_a_context_format_passes(fmt):
    assert problems_of(lambda r: r["encoders"]["text_minilm"].update(input_format=fmt, pooling="target_mean")) == []


def test_the_repository_params_pass():
    assert check_params(REPO / "params.yaml") == []
    params = load_checked_params(REPO / "params.yaml")
    assert params.decode.reader == "auto" and params.data["sample"].allow_outside_root is False
    assert params.head("telme").options == {"paper_defaults": "meld"}
    assert params.store_modality("teacher_minilm") == "text"
    assert params.encoder("visual_c3d").frames == 8
    assert params.finetune_entry("teacher_minilm").weights.startswith("package:")


def test_every_problem_at_once(tmp_path):
    raw = copy.deepcopy(BASE)
    for m in (edit("heads.fusion_mlp.options.hiden", 64), edit("trainer.epochs", "ten"), edit("teachers", [])):
        m(raw)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as e:
        load_checked_params(f)
    text = str(e.value)
    assert "heads.fusion_mlp.options: unknown option 'hiden'" in text and "trainer.epochs:" in text
    assert "heads.telme.features.text" in text and len(e.value.problems) >= 3


def test_yaml_strings_for_floats_give_floats(tmp_path):
    text = (REPO / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    raw["trainer"]["lr"] = "1.0e-3"
    raw["heads"]["fusion_mlp"]["options"]["dropout"] = "2e-1"
    raw["heads"]["telme"]["trainer"] = {"lr": "5e-4"}
    raw["finetune"]["teacher_minilm"]["lr"] = "5e-5"
    f = tmp_path / "params.yaml"
    raw["decode"]["max_clip_seconds"] = "3e1"   # what PyYAML reads from an unquoted 3e1
    f.write_text(yaml.safe_dump(raw))
    params = load_checked_params(f)
    assert params.trainer.lr == 1e-3 and isinstance(params.trainer.lr, float)
    assert params.heads["fusion_mlp"].options["dropout"] == 0.2
    assert params.trainer_for("telme").lr == 5e-4
    assert params.finetune_entry("teacher_minilm").lr == 5e-5
    assert params.decode.max_clip_seconds == 30.0


def test_duplicate_keys_are_reported(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text((REPO / "params.yaml").read_text() + "\ndecode: {frames: 4}\n")
    assert any(p.startswith("decode: duplicate key") for p in check_params(f))


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ParamsFileError, match="no such file"):
        check_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("datasets: [sample\n")
    with pytest.raises(ParamsFileError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ParamsFileError, match="not a mapping"):
        check_params(tmp_path / "list.yaml")


def test_from_dict_validates_dataclasses():
    from pipeline.encoders.text import HFTextConfig
    from pipeline.configs import TextFinetuneParams

    cfg = from_dict(HFTextConfig, {"weights": "w", "max_length": "64", "pooling": "mean"}, "encoders.e")
    assert cfg.max_length == 64 and cfg.pooling == "mean" and cfg.quantize == "none"
    with pytest.raises(ParamsError, match=r"encoders\.e\.pooling: 'max' is not one of") as e:
        from_dict(HFTextConfig, {"weights": "w", "pooling": "max", "batch": 3}, "encoders.e")
    assert "encoders.e: unknown key 'batch'" in str(e.value)   # both problems at once
    with pytest.raises(ParamsError, match=r"finetune\.t\.weights: missing"):
        from_dict(TextFinetuneParams, {}, "finetune.t")


def test_a_stage_stops_before_touching_anything(tmp_path):
    """Every stage validates the schema and cross-references first; head options are checked by the `check`
    stage (upstream of all) and by the train stage, the one that builds heads."""
    from stages import make_sample, train

    out = tmp_path / "sample"
    out.mkdir()
    (out / "keep").write_text("x")
    raw = copy.deepcopy(BASE)
    raw["trainer"]["epochs"] = "ten"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"trainer\.epochs"):
        make_sample.main(["--out", str(out), "--params", str(tmp_path / "params.yaml")])
    assert (out / "keep").exists()
    raw = copy.deepcopy(BASE)
    raw["heads"]["fusion_mlp"]["options"]["hiden"] = 64
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="hiden"):
        train.main(["--dataset", "nowhere", "--head", "fusion_mlp", "--params", str(tmp_path / "params.yaml")])
    stamp = tmp_path / "checked"
    assert ercflow("check", "--params", str(tmp_path / "params.yaml"), "--stamp", str(stamp)).returncode == 1
    assert not stamp.exists()
    assert ercflow("check", "--stamp", str(stamp)).returncode == 0 and stamp.read_text() == "params checked: OK\n"


def test_schema_file_is_current():
    committed = json.loads((REPO / SCHEMA_FILE).read_text())
    assert committed == json.loads(schema_text()), "params.schema.json is stale: run `ercflow schema`"
    assert committed["additionalProperties"] is False
    assert "hf_text" in json.dumps(committed["properties"]["encoders"])


def ercflow(*args, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ercflow", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_check_command_exit_codes(tmp_path):
    ok = ercflow("check")
    assert ok.returncode == 0 and "params.yaml: OK" in ok.stdout, ok.stderr
    raw = copy.deepcopy(BASE)
    raw["heads"]["text_mlp"]["task"] = "categorial"
    raw["trainer"]["epochs"] = "ten"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    bad = ercflow("-q", "check", "--params", str(tmp_path / "params.yaml"))
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert len(lines) == 2 and {line.split(":")[0] for line in lines} == {"heads.text_mlp.task", "trainer.epochs"}
    missing = ercflow("check", "--params", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_cli_in_process(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("heads: {a: [\n")
    assert cli.main(["check", "--params", str(tmp_path / "broken.yaml")]) == 2
    assert cli.main(["schema", "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["title"] == "ercflow params.yaml"
    assert cli.main([]) == 2                   # no command: the usage
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])
    capsys.readouterr()


def test_log_levels(monkeypatch):
    monkeypatch.setenv("ERCFLOW_LOG_LEVEL", "debug")
    assert setup_logging(None) == logging.DEBUG
    assert setup_logging("WARNING") == logging.WARNING
    monkeypatch.delenv("ERCFLOW_LOG_LEVEL")
    assert setup_logging(None) == logging.INFO
    with pytest.raises(ValueError):
        setup_logging("loud")


QUIET_THEN_IMPORT = """
import logging, sys
sys.path.insert(0, {repo!r})
from pipeline.logs import quiet_libraries
quiet_libraries({level})
print("imported before:", "transformers" in sys.modules)
from transformers.utils import logging as hf_logging
print("level:", hf_logging.get_verbosity(), "bars:", hf_logging.is_progress_bar_enabled())
"""


@pytest.mark.parametrize("level, want", [(20, "level: 40 bars: False"), (10, "level: 20 bars: True")],
                         ids=["default", "verbose"])
def test_a_stage_quiets_transformers_without_importing_it(tmp_path, level, want):
    """A stage's logging set-up leaves transformers unimported (a stage that loads no model starts ~0.7 s
    sooner), and transformers imported later still follows it: errors only and no bars, or info and bars
    with -v."""
    script = tmp_path / "quiet.py"
    script.write_text(QUIET_THEN_IMPORT.format(repo=str(REPO), level=level))
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imported before: False" in out.stdout and want in out.stdout, out.stdout
