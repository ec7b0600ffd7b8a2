"""One registration style (pipeline/registry.py) for encoders, heads and dataset adapters; the kinds of encoders
and fine-tunes written once (pipeline/configs.py); params' vocabulary in a leaf, so configs and params do not
import each other."""
import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from pipeline.configs import (ENCODER_CONFIGS, FINETUNE_CONFIGS, AudioFinetuneParams, HFConfig, HFEncoderConfig,
                              TextFinetuneParams, store_modality)
from pipeline.params import DatasetParams, ParamsError, from_dict
from pipeline.registry import UnknownName

REPO = Path(__file__).resolve().parents[1]


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in ("pipeline", "heads", "ercflow", "stages")}


def test_the_vocabulary_is_a_leaf_and_configs_do_not_import_params():
    assert project_imports(REPO / "pipeline" / "vocab.py") == {"pipeline"}
    assert project_imports(REPO / "pipeline" / "registry.py") == {"pipeline"}
    assert not {m for m in project_imports(REPO / "pipeline" / "configs.py") if m.startswith("pipeline.params")}


def test_every_encoder_kind_has_one_encoder_taking_kind_and_modality_from_its_config():
    from pipeline.encoders import ENCODERS, audio, text, visual  # noqa: F401

    assert ENCODERS.names() == ENCODER_CONFIGS.names()
    for kind, cls in ENCODERS.items():
        assert cls.Config is ENCODER_CONFIGS[kind]
        assert (cls.kind, cls.modality) == (kind, ENCODER_CONFIGS[kind].modality)


def test_an_encoder_whose_config_is_not_registered_is_refused():
    from pipeline.encoders import Encoder, register

    @dataclasses.dataclass
    class Unregistered:
        dim: int = 3

    with pytest.raises(TypeError, match="not registered in ENCODER_CONFIGS"):
        @register
        class Stray(Encoder):
            needs_media = False
            Config = Unregistered


def test_transformers_configs_inherit_the_shared_fields_instead_of_copying_them():
    assert {f.name for f in dataclasses.fields(HFEncoderConfig)} == {"weights", "revision", "device", "autocast",
                                                                     "quantize", "runtime"}
    hf = {k for k, c in ENCODER_CONFIGS.items() if issubclass(c, HFConfig)}
    assert hf == {"hf_text", "hf_audio", "hf_video", "visextnet"}
    assert all(issubclass(c, HFConfig) for _, c in FINETUNE_CONFIGS.items())
    for cls in [c for _, c in ENCODER_CONFIGS.items()] + [c for _, c in FINETUNE_CONFIGS.items()]:
        if issubclass(cls, HFConfig):   # hf_text may redeclare `quantize` to allow more values; nothing else
            assert not set(cls.__dict__.get("__annotations__", {})) & {"weights", "revision", "device", "autocast"}


def test_finetune_kinds_and_modalities_come_from_one_registry():
    assert {k: c.modality for k, c in FINETUNE_CONFIGS.items()} == {"hf_text": "text", "hf_audio": "audio",
                                                                      "hf_video": "visual"}
    assert FINETUNE_CONFIGS["hf_text"] is TextFinetuneParams
    finetune = {"t": {"weights": "w"}, "a": {"kind": "hf_audio", "weights": "w"}}
    assert store_modality("t", {}, finetune) == "text" and store_modality("a", {}, finetune) == "audio"
    assert store_modality("x", {"x": {"kind": "cnn3d"}}, {}) == "visual"
    assert store_modality("nope", {}, {}) is None


def test_finetune_entry_builds_teachers_and_students_by_kind(tmp_path):
    from pipeline.params import Params

    p = Params(finetune={"t": {"weights": "w"}, "a": {"kind": "hf_audio", "weights": "w", "lr": "2e-5"}})
    assert isinstance(p.finetune_entry("t"), TextFinetuneParams)
    student = p.finetune_entry("a")
    assert isinstance(student, AudioFinetuneParams) and student.lr == 2e-5
    with pytest.raises(ParamsError, match="finetune: no teacher 'b'"):
        p.finetune_entry("b")
    assert not hasattr(p, "teacher") and not hasattr(p, "finetuned")


def test_a_shared_field_is_checked_in_every_config_that_inherits_it():
    for kind, cls in ENCODER_CONFIGS.items():
        if issubclass(cls, HFConfig):
            with pytest.raises(ParamsError, match=rf"encoders\.e\.device: 'gpu' is not valid"):
                from_dict(cls, {"weights": "w", "device": "gpu"}, "encoders.e")


def test_heads_register_in_a_registry_and_an_unknown_head_lists_the_known_ones():
    from heads import HEADS, register
    from heads.registry import build_head

    assert register == HEADS.register and {"late_fusion", "dialoguetrm", "telme", "matav"} <= set(HEADS.names())
    with pytest.raises(UnknownName, match="unknown head 'nope'; known: .*late_fusion"):
        build_head("nope", {"text": 4}, 3, "categorical", {})


def test_dataset_adapters_are_registered_under_the_names_params_allows():
    from pipeline.datasets import ADAPTERS, generic, iemocap, meld, sample  # noqa: F401

    allowed = typing.get_args(typing.get_type_hints(DatasetParams)["adapter"])
    assert sorted(allowed) == ADAPTERS.names()
    with pytest.raises(UnknownName, match=r"data\.x\.adapter: unknown adapter 'avec'; known: generic, iemocap"):
        from pipeline.datasets import build_manifest

        build_manifest("x", _with_adapter("avec"))


def _with_adapter(name: str) -> DatasetParams:
    """DatasetParams holding an adapter name its Literal refuses (what a caller bypassing params could pass)."""
    p = DatasetParams(adapter="generic", manifest="m")
    object.__setattr__(p, "adapter", name)
    return p
