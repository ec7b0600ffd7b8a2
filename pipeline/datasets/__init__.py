"""Dataset adapters: each turns a dataset on disk into a Manifest plus a list of problems found.

An adapter is a function `build(name, params) -> (Manifest, problems)` registered in `ADAPTERS`
(pipeline/datasets/base.py) under the name `data.<name>.adapter` gives (`@ADAPTERS.register("meld")` in its
module)."""
from __future__ import annotations

from pipeline.datasets.base import ADAPTERS
from pipeline.manifest import Manifest
from pipeline.params import DatasetParams
from pipeline.problems import Problem  # noqa: F401  (the adapters' problem record)


def build_manifest(name: str, params: DatasetParams) -> tuple[Manifest, list[Problem]]:
    from pipeline.datasets import generic, iemocap, meld, sample  # noqa: F401  (fill ADAPTERS)

    return ADAPTERS.get(params.adapter, f"data.{name}.adapter")(name, params)
