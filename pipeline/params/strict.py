"""A dataclass as a strict pydantic model (unknown keys refused, values coerced the lax way: YAML reads `1e-3`
as a string, a float field takes it), and a dataclass built through it: `from_dict(cls, data, where)`, every
problem a `ParamsError` line naming its params path; `as_dict` turns one back into a plain dict."""
from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, ValidationError, create_model

from pipeline.params.messages import validation_problems
from pipeline.vocab import FORBID, ParamsError


def model_fields(cls) -> dict[str, tuple[Any, Any]]:
    """create_model field specs (annotation, default or FieldInfo) of a dataclass or a pydantic model."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return {n: (f.annotation, f) for n, f in cls.model_fields.items()}
    if hasattr(cls, "__pydantic_fields__"):   # a pydantic dataclass
        return {n: (f.annotation, f) for n, f in cls.__pydantic_fields__.items()}
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = (hints[f.name], f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            out[f.name] = (hints[f.name], ...)
    return out


@functools.cache
def strict_model(cls) -> type[BaseModel]:
    """A pydantic model of dataclass `cls` that refuses unknown keys (cached)."""
    return create_model(cls.__name__, __config__=FORBID, __doc__=cls.__doc__, **model_fields(cls))


@functools.cache
def json_schema(model: type[BaseModel]) -> dict:
    """The JSON Schema of `model` (cached: error messages read it for known keys and descriptions)."""
    return model.model_json_schema()


def from_dict(cls, data: Mapping[str, Any] | None, where: str):
    """Build dataclass `cls` from `data`, rejecting unknown keys and bad values, naming `where` in errors."""
    data = dict(data or {})
    model = strict_model(cls)
    try:
        m = model.model_validate(data)
    except ValidationError as e:
        problems = validation_problems(e, where, data, json_schema(model))
        raise ParamsError("\n".join(problems), problems) from None
    return _build(cls, m, where)


def _build(cls, m: BaseModel, where: str):
    """`cls` from its validated model `m`; options the dataclass refuses together (its __post_init__) are a
    ParamsError naming `where`."""
    try:
        return cls(**{k: getattr(m, k) for k in m.model_fields_set})
    except ValueError as e:
        raise ParamsError(f"{where}: {e}") from None


def combination_problem(cls, data: Mapping[str, Any], where: str) -> str | None:
    """What `cls`'s __post_init__ refuses in `data` (options that do not go together), or None; data the
    schema refuses is left to the schema's messages."""
    try:
        m = strict_model(cls).model_validate(dict(data))
    except ValidationError:
        return None
    try:
        _build(cls, m, where)
    except ParamsError as e:
        return str(e)
    return None


def as_dict(obj) -> dict[str, Any]:
    """A params section or config as a plain dict (a dataclass, a pydantic model or a mapping)."""
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    return dict(obj) if isinstance(obj, Mapping) else dict(vars(obj))
