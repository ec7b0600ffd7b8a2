"""The shared vocabulary of params: its errors, constrained types and allowed values.

A leaf module (it imports nothing of the project but `pipeline.UserError`): the section dataclasses of
pipeline/params/ and the encoder and fine-tune configs of pipeline/configs.py both use it, and neither imports
the other for it.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from pipeline import UserError

PARAMS_FILE = "params.yaml"
FORBID = ConfigDict(extra="forbid")   # a key the schema does not know is an error, never a silent default
MODALITIES = ("text", "audio", "visual")


class ParamsError(UserError, ValueError):
    """A problem with params.yaml; `problems` holds one line per problem, each starting with its path."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class ParamsFileError(ParamsError):
    """params.yaml is missing, is not YAML, or is not a mapping of sections."""


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Dropout = Annotated[float, Field(ge=0, lt=1)]
Seed = Annotated[int, Field(ge=0)]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda | cuda:N")]
Autocast = Literal["bf16", "fp16", "none"]       # CUDA only
Quantize = Literal["int8", "none"]               # CPU only: dynamic int8 Linear layers
Runtime = Literal["torch", "onnx"]               # CPU only: onnx runs the model with ONNX Runtime (float32)
Modality = Literal["text", "audio", "visual"]
# a dataset, encoder, teacher or head name: it becomes a file name and part of a DVC stage name
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            description="letters, digits, _ . - (not first): it names files and DVC stages")]
