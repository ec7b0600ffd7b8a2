"""Dataset adapters: each turns a dataset on disk into a Manifest plus a list of problems found."""
from __future__ import annotations

from pipeline.manifest import Manifest
from pipeline.problems import Problem  # noqa: F401  (the adapters' problem record)
from pipeline.params import DatasetParams


def build_manifest(name: str, params: DatasetParams) -> tuple[Manifest, list[Problem]]:
    from pipeline.datasets import generic, iemocap, meld, sample

    adapters = {"meld": meld.build, "iemocap": iemocap.build, "generic": generic.build, "sample": sample.build}
    if params.adapter not in adapters:
        raise ValueError(f"data.{name}.adapter: unknown adapter '{params.adapter}'; known: {sorted(adapters)}")
    return adapters[params.adapter](name, params)
