"""`ercflow check`: validate params.yaml up front, every problem at once, one line each.

The schema and the cross-references live in `pipeline/params/`; this module adds what pipeline/ cannot
see (it does not import heads/): each head's `options`, checked against a model derived from the head
class's `__init__` signature (names, annotated types, defaults; `paper_defaults` must name a key of the
class's `PAPER_DEFAULTS`). Every stage loads its params through `load_checked_params`, so a mistake stops
`dvc repro` before any work. Nothing here loads a model.

Conventions by option name (the signatures cannot say them): `dropout` is in [0, 1); `hidden`, `d_model`,
`d_proj`, `queue_size` and `heads` / `*_heads` are positive, and every `heads` / `*_heads` divides
`d_model` when the head has one (attention splits d_model over its heads).
"""
from __future__ import annotations

import functools
import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from pipeline.params import (PARAMS_FILE, Params, ParamsFileError, load_params, params_json_schema,
                             validate_params_file)

HEAD_ARGS = ("self", "dims", "n_out", "task")   # what build_head passes itself; not options
POSITIVE = ("hidden", "d_model", "d_proj", "queue_size")


def _is_heads(name: str) -> bool:
    return name == "heads" or name.endswith("_heads")


def _option_type(name: str, annotation: Any, default: Any) -> Any:
    if annotation is inspect.Parameter.empty:
        annotation = type(default) if isinstance(default, (bool, int, float, str)) else Any
    if name == "dropout":
        return Annotated[annotation, Field(ge=0, lt=1)]
    if name in POSITIVE or _is_heads(name):
        return Annotated[annotation, Field(gt=0)]
    return annotation


def options_model(name: str, cls: type) -> type[BaseModel]:
    """The options of head `name` (class `cls`) as a pydantic model: one field per `__init__` parameter."""
    sig = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)   # keep Field(gt=0) etc.
    except Exception:   # an annotation that does not resolve: fall back to the defaults' types
        hints = {}
    fields: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    extra = "forbid"
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            extra = "allow"
        if p.name in HEAD_ARGS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (_option_type(p.name, hints.get(p.name, p.annotation), p.default), default)
        defaults[p.name] = p.default
    presets = getattr(cls, "PAPER_DEFAULTS", None)
    if presets:
        fields["paper_defaults"] = (Optional[Literal[tuple(presets)]], Field(
            None, description="a row of the paper's hyperparameter table; explicit options win"))

    def divisible(model):
        """Attention splits d_model over its heads: every `heads` / `*_heads` must divide `d_model`."""
        given = {k: getattr(model, k) for k in model.model_fields_set if k != "paper_defaults"}
        values = {**defaults, **(presets or {}).get(getattr(model, "paper_defaults", None), {}), **given}
        d = values.get("d_model")
        if isinstance(d, int) and d > 0:
            bad = [f"{k} ({v})" for k, v in sorted(values.items())
                   if _is_heads(k) and isinstance(v, int) and v > 0 and d % v]
            if bad:
                raise ValueError(f"d_model ({d}) is not divisible by {', '.join(bad)}")
        head_check = getattr(cls, "check_options", None)   # a head's own rule over its resolved options
        if head_check is not None:
            head_check(values)
        return model

    return create_model(f"{cls.__name__}Options", __config__=ConfigDict(extra=extra),
                        __doc__=f"heads.<name>.options of head `{name}` ({cls.__module__}.{cls.__name__})",
                        __validators__={"divisible": model_validator(mode="after")(divisible)}, **fields)


@functools.cache
def head_options() -> dict[str, type[BaseModel]]:
    """Head registry name -> options model, for every head in heads/."""
    from heads.registry import HEADS

    return {name: options_model(name, cls) for name, cls in sorted(HEADS.items())}


def check_params(path: str | Path = PARAMS_FILE) -> list[str]:
    """Every problem of the params file at `path`, one line each, starting with its params path ([] = good).
    A missing or unreadable file, or one that is not YAML, raises `ParamsFileError`."""
    return validate_params_file(path, head_options())[1]


def load_checked_params(path: str | Path = PARAMS_FILE) -> Params:
    """The params of `path`, checked in full (head options included); one `ParamsError` lists every problem."""
    return load_params(path, head_options())


def params_schema() -> dict:
    """The JSON Schema of params.yaml, head options included."""
    return params_json_schema(head_options())


# --- the command ------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--params", default=PARAMS_FILE, help="the params file (default: %(default)s)")
    parser.add_argument("--stamp", default=None,
                        help="when clean, write a fixed line to this file: the output of dvc.yaml's `check` stage, "
                             "which every other stage depends on (its content never changes, so it orders the "
                             "stages without re-running any)")


def run(args) -> int:
    """0: no problem; 1: problems (printed one per line); 2: the file is missing or not YAML."""
    try:
        params, problems = validate_params_file(args.params, head_options())
    except ParamsFileError as e:
        print(f"ercflow check: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    if problems:
        print(f"{args.params}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.params}: OK ({len(params.datasets)} dataset(s), {len(params.extract)} encoder(s), "
          f"{len(params.teachers)} teacher(s), {len(params.train)} head(s) to train)")
    if args.stamp:
        from pipeline.store import atomic_write_text

        atomic_write_text(args.stamp, "params checked: OK\n")
    return 0
