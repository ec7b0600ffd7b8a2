"""The one place that reads params.yaml: its schema, its validation and its JSON Schema.

Every section is a pydantic dataclass with `extra="forbid"`: a typo in params.yaml is an error, never a
silent default. Types are coerced the lax way (YAML reads `1e-3` as a string; a float field takes it),
allowed values are `Literal[...]`, ranges are `Field` constraints (pipeline/vocab.py).

    sections.py   the section dataclasses and `Params` (the whole file) with the stages' look-ups
    strict.py     a dataclass as a strict pydantic model; `from_dict` builds one, naming its params path
    schema.py     the model of the whole file (encoder and fine-tune kinds, head options) and its JSON Schema
    messages.py   pydantic's errors as one line each, params path first
    crossref.py   problems between sections, checked after the schema
    read.py       reading the file (duplicate keys too), `validate_params`, `load_params`

Encoder configs (`encoders.<name>`, chosen by `kind`) and fine-tune configs (`finetune.<name>`, chosen by
`kind`, `hf_text` when absent) are the registered dataclasses of pipeline/configs.py. Head options are checked
by `ercflow/check.py`, which derives a model from each head's `__init__` (pipeline/ does not import heads/) and
passes it in as `head_options`; every stage loads its params through it. Every problem is reported at once.
"""
from pipeline.params.crossref import cross_reference_problems
from pipeline.params.messages import validation_problems
from pipeline.params.read import load_params, read_params_file, validate_params, validate_params_file
from pipeline.params.schema import params_json_schema, schema_model
from pipeline.params.sections import (DatasetParams, DecodeParams, DistilParams, HeadParams, Params, SampleParams,
                                      TrainerParams)
from pipeline.params.strict import as_dict, combination_problem, from_dict, strict_model
from pipeline.vocab import PARAMS_FILE, ParamsError, ParamsFileError

__all__ = ["PARAMS_FILE", "DatasetParams", "DecodeParams", "DistilParams", "HeadParams", "Params", "ParamsError",
           "ParamsFileError", "SampleParams", "TrainerParams", "as_dict", "combination_problem",
           "cross_reference_problems", "from_dict", "load_params", "params_json_schema", "read_params_file",
           "schema_model", "strict_model", "validate_params", "validate_params_file", "validation_problems"]
