"""Reading a params file: its raw sections and duplicate keys, validated by the schema and the cross-references,
every problem at once; `load_params` raises them as one `ParamsError`."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from pipeline.params.crossref import cross_reference_problems
from pipeline.params.messages import validation_problems
from pipeline.params.schema import schema_model
from pipeline.params.sections import Params
from pipeline.params.strict import json_schema
from pipeline.vocab import PARAMS_FILE, ParamsError, ParamsFileError


def read_params_file(path: str | Path = PARAMS_FILE) -> tuple[dict[str, Any], list[str]]:
    """The raw sections of a params file and its duplicate keys (PyYAML would keep the last one silently)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsFileError(f"{path}: cannot read: {e}") from None
    try:
        raw = yaml.safe_load(text)
        duplicates = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ParamsFileError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsFileError(f"{path}: not a mapping of sections (the file holds a {type(raw).__name__})")
    return raw, duplicates


def _duplicate_keys(node, path: str = "") -> list[str]:
    out = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            sub = f"{path}.{key}" if path else str(key)
            if key is not None and key in seen:
                out.append(f"{sub}: duplicate key (lines {seen[key] + 1} and {k.start_mark.line + 1}; "
                           "YAML keeps only the last)")
            if key is not None:
                seen[key] = k.start_mark.line
            out += _duplicate_keys(v, sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out += _duplicate_keys(v, f"{path}[{i}]")
    return out


def validate_params(raw: Mapping[str, Any], head_options: Mapping[str, type[BaseModel]] | None = None
                    ) -> tuple[Params | None, list[str]]:
    """(`Params`, []) for good raw sections, else (None, every problem, one line each, path first)."""
    raw = {k: v for k, v in raw.items() if v is not None}   # an empty section takes its defaults
    model = schema_model(head_options)
    problems: list[str] = []
    validated = None
    try:
        validated = model.model_validate(raw)
    except ValidationError as e:
        problems += validation_problems(e, "", raw, json_schema(model))
    problems += cross_reference_problems(raw)
    problems = list(dict.fromkeys(problems))
    if problems:
        return None, problems
    # the validated values (YAML strings coerced to floats, ...) as the plain objects the stages read
    return TypeAdapter(Params).validate_python(validated.model_dump(exclude_unset=True)), []


def validate_params_file(path: str | Path = PARAMS_FILE, head_options: Mapping[str, type[BaseModel]] | None = None
                         ) -> tuple[Params | None, list[str]]:
    """(`Params`, []) for a good file at `path`, else (None, every problem: duplicate keys first). A missing or
    unreadable file, or one that is not YAML, raises `ParamsFileError`."""
    raw, duplicates = read_params_file(path)
    params, problems = validate_params(raw, head_options)
    problems = duplicates + problems
    return (None if problems else params), problems


def load_params(path: str | Path = PARAMS_FILE, head_options: Mapping[str, type[BaseModel]] | None = None
                ) -> Params:
    """Read and validate a params file; one `ParamsError` lists every problem (the stages load through
    ercflow.check, which adds the heads' options)."""
    params, problems = validate_params_file(path, head_options)
    if problems:
        raise ParamsError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(problems), problems)
    return params
