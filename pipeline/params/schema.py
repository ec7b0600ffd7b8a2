"""The model of the whole params file, derived from the section dataclasses (sections.py), the config of each
encoder and fine-tune kind (pipeline/configs.py) and, when given, each head's options model (ercflow/check.py
derives them from the heads' `__init__`): one definition of every key, used to validate and for the JSON Schema.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, Discriminator, Field, Tag, create_model

from pipeline.configs import DEFAULT_FINETUNE_KIND, ENCODER_CONFIGS, FINETUNE_CONFIGS
from pipeline.params.sections import HeadParams, Params, TrainerParams
from pipeline.params.strict import json_schema, model_fields, strict_model
from pipeline.vocab import FORBID, Name


def _optional(cls, name: str) -> type[BaseModel]:
    """Every field of `cls` optional (None: not given), with its type and constraints: an override."""
    fields = {}
    for n, (ann, info) in model_fields(cls).items():
        meta = list(getattr(info, "metadata", []))
        ann = Annotated[(ann, *meta)] if meta else ann
        fields[n] = (Optional[ann], Field(None, description=getattr(info, "description", None)))
    return create_model(name, __config__=FORBID, **fields)


def _encoder_model(kind: str, config: type) -> type[BaseModel]:
    """`encoders.<name>` of kind `kind`: its config's keys, `kind` itself and an optional, checked `modality`."""
    return create_model(config.__name__, __doc__=f"encoders.<name> of kind {kind}", __config__=FORBID,
                        kind=(Literal[kind], ...),
                        modality=(Optional[Literal[config.modality]], Field(None, description="optional; checked")),
                        **model_fields(config))


def _finetune_kind(value) -> str | None:
    """The tag of a `finetune.<name>` entry: its `kind`, `hf_text` when absent (pydantic's discriminator)."""
    if isinstance(value, dict):
        return value.get("kind", DEFAULT_FINETUNE_KIND)
    return getattr(value, "kind", None)


def _finetune_model() -> Any:
    variants = tuple(Annotated[strict_model(cls), Tag(k)] for k, cls in sorted(FINETUNE_CONFIGS.items()))
    return Annotated[Union[variants], Discriminator(_finetune_kind)]


@functools.cache
def _schema_model(kinds: tuple[tuple[str, type], ...],
                  head_options: tuple[tuple[str, type[BaseModel]], ...] | None) -> type[BaseModel]:
    variants = tuple(_encoder_model(k, c) for k, c in kinds)
    encoder = Annotated[Union[variants], Field(discriminator="kind")] if len(variants) > 1 else variants[0]
    overrides = _optional(TrainerParams, "TrainerOverrides")
    head_fields = {**model_fields(HeadParams), "trainer": (overrides, Field(default_factory=overrides))}
    if head_options is None:
        head = create_model("HeadParams", __config__=FORBID, **head_fields)
    else:
        heads = tuple(create_model(f"Head_{name}", __config__=FORBID,
                                   **{**head_fields, "head": (Literal[name], ...),
                                      "options": (opts, Field(default_factory=opts))})
                      for name, opts in head_options)
        head = Annotated[Union[heads], Field(discriminator="head")] if len(heads) > 1 else heads[0]
    fields = {**model_fields(Params),
              "encoders": (dict[Name, encoder], Field(default_factory=dict)),
              "finetune": (dict[Name, _finetune_model()], Field(default_factory=dict)),
              "heads": (dict[Name, head], Field(default_factory=dict))}
    return create_model("Params", __config__=FORBID, __doc__="ercflow params.yaml", **fields)


def schema_model(head_options: Mapping[str, type[BaseModel]] | None = None) -> type[BaseModel]:
    """The model of the whole file: `Params` with each encoder kind's, the teachers' and (when given, head
    registry name -> options model) each head's options filled in. Used to validate and for the JSON Schema."""
    return _schema_model(tuple(sorted(ENCODER_CONFIGS.items())),
                         None if head_options is None else tuple(sorted(head_options.items())))


def params_json_schema(head_options: Mapping[str, type[BaseModel]] | None = None) -> dict:
    schema = dict(json_schema(schema_model(head_options)))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "ercflow params.yaml",
            **{k: v for k, v in schema.items() if k != "title"}}
