"""Dataset adapters: each turns a dataset on disk into a Manifest plus a list of problems found."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.manifest import Manifest
from pipeline.params import DatasetParams


@dataclass
class Problem:
    """Something wrong with one utterance's input, reported by a stage and written to its summary."""
    utt_id: str
    file: str
    problem: str

    def __str__(self) -> str:
        return f"{self.utt_id}: {self.problem} ({self.file})"


def build_manifest(name: str, params: DatasetParams) -> tuple[Manifest, list[Problem]]:
    from pipeline.datasets import generic, iemocap, meld, sample

    adapters = {"meld": meld.build, "iemocap": iemocap.build, "generic": generic.build, "sample": sample.build}
    if params.adapter not in adapters:
        raise ValueError(f"data.{name}.adapter: unknown adapter '{params.adapter}'; known: {sorted(adapters)}")
    return adapters[params.adapter](name, params)
