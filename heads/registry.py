"""Every head by its registry name: importing this module registers them all (`HEADS`), and `build_head`
builds one. Kept apart from heads/__init__.py so that code needing one head's parts (heads/telme_students.py takes
TelME's losses) imports that head alone, and its DVC stage depends on that file, not on every head."""
from __future__ import annotations

from heads import HEADS, ERCHead
from heads import baselines, dialoguetrm, label_scores, matav, telme  # noqa: F401  (fill the registry)


def head_class_and_options(name: str, options: dict) -> tuple[type[ERCHead], dict]:
    """The class of head `name` and its options with its `paper_defaults` row (if given) under them; an unknown
    name is an `UnknownName` (a UserError) listing the known ones."""
    cls = HEADS.get(name)
    options = dict(options)
    preset = options.pop("paper_defaults", None)
    if preset is not None:
        presets = getattr(cls, "PAPER_DEFAULTS", {})
        if preset not in presets:
            raise ValueError(f"head '{name}': no paper_defaults '{preset}'; known: {sorted(presets)}")
        options = {**presets[preset], **options}   # explicit options override the paper's table
    return cls, options


def build_head(name: str, dims: dict[str, int], n_out: int, task: str, options: dict) -> ERCHead:
    """Head `name` for inputs `dims` and `n_out` outputs, its `paper_defaults` row (if given) under `options`."""
    cls, options = head_class_and_options(name, options)
    return cls(dims, n_out, task, **options)


def input_normalization(name: str, modalities: list[str], options: dict) -> dict[str, bool]:
    """Per modality, whether head `name` with `options` reads it standardised (True) or raw: the `normalize`
    argument of `heads.data.CachedDialogues` (see `ERCHead.normalization`)."""
    cls, options = head_class_and_options(name, options)
    return cls.normalization(list(modalities), **options)
