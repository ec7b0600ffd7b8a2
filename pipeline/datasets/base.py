"""The adapter registry: a dataset adapter is a function `build(name, params) -> (Manifest, problems)`
registered under the name `data.<name>.adapter` gives (`@ADAPTERS.register("meld")` in its module)."""
from __future__ import annotations

from typing import Callable

from pipeline.manifest import Manifest
from pipeline.problems import Problem
from pipeline.registry import Registry

ADAPTERS: Registry[Callable[..., tuple[Manifest, list[Problem]]]] = Registry("adapter")
