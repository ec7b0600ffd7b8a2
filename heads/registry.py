"""Every head by its registry name: importing this module registers them all (`HEADS`), and `build_head`
builds one. Kept apart from heads/__init__.py so that code needing one head's parts (pipeline/distil.py takes
TelME's losses) imports that head alone, and its DVC stage depends on that file, not on every head."""
from __future__ import annotations

from heads import HEADS, ERCHead
from heads import baselines, dialoguetrm, matav, telme  # noqa: F401  (fill the registry)


def build_head(name: str, dims: dict[str, int], n_out: int, task: str, options: dict) -> ERCHead:
    if name not in HEADS:
        raise ValueError(f"unknown head '{name}'; known: {sorted(HEADS)}")
    cls = HEADS[name]
    options = dict(options)
    preset = options.pop("paper_defaults", None)
    if preset is not None:
        presets = getattr(cls, "PAPER_DEFAULTS", {})
        if preset not in presets:
            raise ValueError(f"head '{name}': no paper_defaults '{preset}'; known: {sorted(presets)}")
        options = {**presets[preset], **options}   # explicit options override the paper's table
    return cls(dims, n_out, task, **options)
