"""The one place that reads params.yaml: its schema, its validation and its JSON Schema.

Every section is a pydantic dataclass with `extra="forbid"`: a typo in params.yaml is an error, never a
silent default. Types are coerced the lax way (YAML reads `1e-3` as a string; a float field takes it),
allowed values are `Literal[...]`, ranges are `Field` constraints.

Encoder configs (`encoders.<name>`, chosen by `kind`) and fine-tune configs (`finetune.<name>`, chosen by
`kind`, `hf_text` when absent) are validated from the dataclasses of pipeline/configs.py (imported lazily:
that module imports this one). Head options are checked by `ercflow/check.py`, which derives a model from each
head's `__init__` (pipeline/ does not import heads/) and passes it in as `head_options`; every stage loads
its params through it. Cross-references (a listed dataset has a `data` entry, a head's store is extracted or
fine-tuned and of the right modality, ...) are checked after the schema, and every problem is reported at
once, one line each, starting with its params path.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, create_model
from pydantic.dataclasses import dataclass

from pipeline import UserError

PARAMS_FILE = "params.yaml"
FORBID = ConfigDict(extra="forbid")
MODALITIES = ("text", "audio", "visual")


class ParamsError(UserError, ValueError):
    """A problem with params.yaml; `problems` holds one line per problem, each starting with its path."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class ParamsFileError(ParamsError):
    """params.yaml is missing, is not YAML, or is not a mapping of sections."""


# The shared vocabulary of params (encoder configs import these too)
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
Modality = Literal["text", "audio", "visual"]
# a dataset, encoder, teacher or head name: it becomes a file name and part of a DVC stage name
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            description="letters, digits, _ . - (not first): it names files and DVC stages")]


@dataclass(config=FORBID)
class SampleParams:
    """The bundled synthetic dataset (pipeline/datasets/sample.py)."""
    seed: Seed = 0
    dialogues: PositiveInt = 60
    min_turns: PositiveInt = 6
    max_turns: PositiveInt = 14
    min_seconds: PositiveFloat = 1.0
    max_seconds: PositiveFloat = 2.5
    fps: PositiveInt = 12
    size: PositiveInt = 64
    sample_rate: PositiveInt = 16000
    # probability that each modality carries the emotion cue of an utterance
    p_text: Probability = 0.45
    p_audio: Probability = 0.55
    p_visual: Probability = 0.55


@dataclass(config=FORBID)
class DatasetParams:
    adapter: Literal["sample", "meld", "iemocap", "generic"]
    # dataset root; media paths in the manifest are relative to it (needed only when the dataset has media)
    root: Optional[str] = None
    csv_dir: Optional[str] = None    # MELD: folder of the official *_sent_emo.csv files (default: root)
    manifest: Optional[str] = None   # generic: path of the CSV/JSONL manifest
    dev_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1   # IEMOCAP: share of session 1-4 dialogues held out as dev
    seed: Seed = 0
    labels: Optional[Annotated[list[str], Field(min_length=1)]] = None   # fixed label order; default: the adapter's
    allow_outside_root: bool = False  # media paths may leave `root` (a trusted, hand-written manifest)


@dataclass(config=FORBID)
class DecodeParams:
    sample_rate: PositiveInt = 16000
    frames: PositiveInt = 8          # canonical frames per utterance, uniform over the clip
    size: PositiveInt = 64           # frames are resized to size x size
    max_clip_seconds: PositiveFloat = 30.0
    long_clip: Literal["trim", "mask"] = "trim"       # a clip longer than max_clip_seconds
    on_bad_media: Literal["mask", "fail"] = "mask"    # corrupt/missing media, no audio track
    chunk_size: PositiveInt = 64     # utterances per resumable chunk
    reader: Literal["auto", "decord", "pyav"] = "auto"   # auto: decord when importable, else PyAV


@dataclass(config=FORBID)
class TrainerParams:
    batch_dialogues: PositiveInt = 8
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.01
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    epochs: PositiveInt = 40
    patience: PositiveInt = 8        # early stopping on dev weighted F1
    seed: Seed = 0
    # several seeds: the head is trained once per seed, metrics reported as mean ± std, the best-dev seed kept
    seeds: Annotated[list[Seed], Field(min_length=1)] | None = None
    device: Device = "auto"
    # torch threads while a head trains on a CPU (0: torch's default, every core); see heads/trainer.py
    threads: NonNegativeInt = 1
    grad_clip: NonNegativeFloat = 1.0   # 0: no clipping
    # categorical heads: CE weighted per class from the train split's counts (none | inverse | sqrt_inverse)
    class_weights: Literal["none", "inverse", "sqrt_inverse"] = "none"
    focal_gamma: NonNegativeFloat = 0.0   # > 0: focal loss (1 - p_y)^gamma CE; 0: plain (weighted) CE

    def __post_init__(self):
        if self.seeds and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must differ from each other (a repeated seed repeats a run): {self.seeds}")


@dataclass(config=FORBID)
class HeadParams:
    head: str                                   # registry name in heads/
    task: Literal["categorical", "dimensional"] = "categorical"   # softmax over labels | regression
    modalities: Annotated[list[Modality], Field(min_length=1)] = dataclasses.field(
        default_factory=lambda: ["text", "audio", "visual"])
    options: dict[str, Any] = dataclasses.field(default_factory=dict)     # head-specific (ercflow/check.py)
    features: dict[Modality, Name] = dataclasses.field(default_factory=dict)   # per-head override of `features`
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)     # overrides of the shared trainer


@dataclass(config=FORBID)
class DistilParams:
    """Students distilled from a teacher store (TelME's audio/visual students; stage finetune_student)."""
    teacher: Optional[Name] = None   # a fine-tuned text teacher (in `teachers`): its store's logits and features
    students: list[Name] = dataclasses.field(default_factory=list)   # entries of `finetune`, fine-tuned against it


@dataclass(config=FORBID)
class Params:
    datasets: list[Name] = dataclasses.field(default_factory=list)    # what `dvc repro` runs
    samples: list[Name] = dataclasses.field(default_factory=list)     # synthetic datasets generated (make_sample)
    extract: list[Name] = dataclasses.field(default_factory=list)
    teachers: list[Name] = dataclasses.field(default_factory=list)
    train: list[Name] = dataclasses.field(default_factory=list)
    sample: SampleParams = dataclasses.field(default_factory=SampleParams)
    data: dict[Name, DatasetParams] = dataclasses.field(default_factory=dict)
    decode: DecodeParams = dataclasses.field(default_factory=DecodeParams)
    encoders: dict[Name, dict[str, Any]] = dataclasses.field(default_factory=dict)   # each with its `kind`
    features: dict[Modality, Name] = dataclasses.field(default_factory=dict)  # modality -> store feeding heads
    trainer: TrainerParams = dataclasses.field(default_factory=TrainerParams)
    heads: dict[Name, HeadParams] = dataclasses.field(default_factory=dict)
    finetune: dict[Name, dict[str, Any]] = dataclasses.field(default_factory=dict)   # by kind (pipeline/configs.py)
    distil: DistilParams = dataclasses.field(default_factory=DistilParams)

    def head(self, name: str) -> HeadParams:
        if name not in self.heads:
            raise ParamsError(f"heads: no head '{name}'; defined: {sorted(self.heads)}")
        return self.heads[name]

    def trainer_for(self, name: str) -> TrainerParams:
        overrides = {k: v for k, v in self.head(name).trainer.items() if v is not None}   # null: the shared value
        merged = {**dataclasses.asdict(self.trainer), **overrides}
        return from_dict(TrainerParams, merged, f"heads.{name}.trainer")

    def feature_stores(self, dataset: str, head: str) -> dict[str, str]:
        """modality -> the feature store head `head` reads on `dataset` (`features`, then its own override)."""
        hp = self.head(head)
        chosen = {**self.features, **hp.features}
        missing = [m for m in hp.modalities if m not in chosen]
        if missing:
            raise ParamsError(f"features: no store chosen for modality {missing} (params `features` / "
                              f"heads.{head}.features)")
        return {m: f"data/features/{dataset}/{chosen[m]}.h5" for m in hp.modalities}

    def seeds_for(self, name: str) -> list[int]:
        """The seeds head `name` is trained with: `trainer.seeds`, else `[trainer.seed]`."""
        trainer = self.trainer_for(name)
        return list(trainer.seeds) if trainer.seeds else [trainer.seed]

    def dataset(self, name: str) -> DatasetParams:
        if name not in self.data:
            raise ParamsError(f"data: no dataset '{name}'; defined: {sorted(self.data)}")
        return self.data[name]

    def encoder(self, name: str):
        """The `Config` dataclass instance of encoder `name` (its kind: `self.encoders[name]["kind"]`)."""
        if name not in self.encoders:
            raise ParamsError(f"encoders: no encoder '{name}'; defined: {sorted(self.encoders)}")
        raw = dict(self.encoders[name])
        kind = raw.pop("kind", None)
        raw.pop("modality", None)
        kinds = encoder_kinds()
        if kind not in kinds:
            raise ParamsError(f"encoders.{name}.kind: unknown encoder kind {kind!r}; known: {sorted(kinds)}")
        return from_dict(kinds[kind].Config, raw, f"encoders.{name}")

    def teacher(self, name: str):
        """The params of fine-tune `name` (`FinetuneParams` for a text teacher; by its `kind` otherwise)."""
        if name not in self.finetune:
            raise ParamsError(f"finetune: no teacher '{name}'; defined: {sorted(self.finetune)}")
        raw = dict(self.finetune[name])
        kinds = finetune_kinds()
        kind = raw.setdefault("kind", DEFAULT_FINETUNE_KIND)
        if kind not in kinds:
            raise ParamsError(f"finetune.{name}.kind: unknown kind {kind!r}; known: {sorted(kinds)}")
        return from_dict(kinds[kind], raw, f"finetune.{name}")

    finetuned = teacher

    def store_modality(self, name: str) -> str | None:
        """The modality of the store written by encoder or teacher `name` (None: no such one)."""
        return _store_modality(name, self.encoders, self.finetune, {k: c.modality for k, c in encoder_kinds().items()})


# --- the encoder configs, imported lazily (pipeline/configs.py imports this module) ----------------------

def encoder_kinds() -> dict:
    """kind -> `EncoderKind(modality, Config)` of every encoder kind (pipeline/configs.py)."""
    from pipeline.configs import KINDS

    return dict(KINDS)


def finetune_config() -> type:
    from pipeline.configs import FinetuneParams

    return FinetuneParams


DEFAULT_FINETUNE_KIND = "hf_text"   # a `finetune.<name>` without `kind` is a text teacher (as before kinds)


def finetune_kinds() -> dict[str, type]:
    """kind -> the params dataclass of a `finetune.<name>` of that kind (pipeline/configs.py)."""
    from pipeline.configs import FINETUNE_KINDS

    return dict(FINETUNE_KINDS)


def finetune_modalities() -> dict[str, str]:
    from pipeline.configs import FINETUNE_MODALITY

    return dict(FINETUNE_MODALITY)


def _finetune_kind(value) -> str | None:
    """The tag of a `finetune.<name>` entry: its `kind`, `hf_text` when absent (pydantic's discriminator)."""
    if isinstance(value, dict):
        return value.get("kind", DEFAULT_FINETUNE_KIND)
    return getattr(value, "kind", None)


def _finetune_model() -> Any:
    variants = tuple(Annotated[strict_model(cls), Tag(k)] for k, cls in sorted(finetune_kinds().items()))
    return Annotated[Union[variants], Discriminator(_finetune_kind)]


# --- models derived from the dataclasses: one definition each ---------------------------------------------

def _fields(cls) -> dict[str, tuple[Any, Any]]:
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
    return create_model(cls.__name__, __config__=FORBID, __doc__=cls.__doc__, **_fields(cls))


def _optional(cls, name: str) -> type[BaseModel]:
    """Every field of `cls` optional (None: not given), with its type and constraints: an override."""
    fields = {}
    for n, (ann, info) in _fields(cls).items():
        meta = list(getattr(info, "metadata", []))
        ann = Annotated[(ann, *meta)] if meta else ann
        fields[n] = (Optional[ann], Field(None, description=getattr(info, "description", None)))
    return create_model(name, __config__=FORBID, **fields)


def _encoder_model(kind: str, cls) -> type[BaseModel]:
    config = cls.Config
    typed = dataclasses.is_dataclass(config) or (isinstance(config, type) and issubclass(config, BaseModel))
    return create_model(getattr(config, "__name__", kind), __doc__=f"encoders.<name> of kind {kind}",
                        __config__=FORBID if typed else ConfigDict(extra="allow"),
                        kind=(Literal[kind], ...),
                        modality=(Optional[Literal[cls.modality]], Field(None, description="optional; checked")),
                        **(_fields(config) if typed else {}))


@functools.cache
def _schema_model(kinds: tuple[tuple[str, type], ...],
                  head_options: tuple[tuple[str, type[BaseModel]], ...] | None) -> type[BaseModel]:
    variants = tuple(_encoder_model(k, c) for k, c in kinds)
    encoder = Annotated[Union[variants], Field(discriminator="kind")] if len(variants) > 1 else variants[0]
    overrides = _optional(TrainerParams, "TrainerOverrides")
    head_fields = {**_fields(HeadParams), "trainer": (overrides, Field(default_factory=overrides))}
    if head_options is None:
        head = create_model("HeadParams", __config__=FORBID, **head_fields)
    else:
        heads = tuple(create_model(f"Head_{name}", __config__=FORBID,
                                   **{**head_fields, "head": (Literal[name], ...),
                                      "options": (opts, Field(default_factory=opts))})
                      for name, opts in head_options)
        head = Annotated[Union[heads], Field(discriminator="head")] if len(heads) > 1 else heads[0]
    fields = {**_fields(Params),
              "encoders": (dict[Name, encoder], Field(default_factory=dict)),
              "finetune": (dict[Name, _finetune_model()], Field(default_factory=dict)),
              "heads": (dict[Name, head], Field(default_factory=dict))}
    return create_model("Params", __config__=FORBID, __doc__="ercflow params.yaml", **fields)


def schema_model(head_options: Mapping[str, type[BaseModel]] | None = None) -> type[BaseModel]:
    """The model of the whole file: `Params` with each encoder kind's, the teachers' and (when given, head
    registry name -> options model) each head's options filled in. Used to validate and for the JSON Schema."""
    return _schema_model(tuple(sorted(encoder_kinds().items())),
                         None if head_options is None else tuple(sorted(head_options.items())))


@functools.cache
def _json_schema(model: type[BaseModel]) -> dict:
    return model.model_json_schema()


def params_json_schema(head_options: Mapping[str, type[BaseModel]] | None = None) -> dict:
    schema = dict(_json_schema(schema_model(head_options)))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "ercflow params.yaml",
            **{k: v for k, v in schema.items() if k != "title"}}


# --- reading and validating -------------------------------------------------------------------------------

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
    """(`Params`, []) for a good file, else (None, every problem, one line each, path first)."""
    raw = {k: v for k, v in raw.items() if v is not None}   # an empty section takes its defaults
    model = schema_model(head_options)
    problems: list[str] = []
    validated = None
    try:
        validated = model.model_validate(raw)
    except ValidationError as e:
        problems += validation_problems(e, "", raw, _json_schema(model))
    kinds = {k: c.modality for k, c in encoder_kinds().items()}
    problems += cross_reference_problems(raw, kinds)
    problems = list(dict.fromkeys(problems))
    if problems:
        return None, problems
    # the validated values (YAML strings coerced to floats, ...) as the plain objects the stages read
    return TypeAdapter(Params).validate_python(validated.model_dump(exclude_unset=True)), []


def parse_params(raw: Mapping[str, Any], head_options: Mapping[str, type[BaseModel]] | None = None,
                 where: str = PARAMS_FILE) -> Params:
    params, problems = validate_params(raw, head_options)
    if problems:
        raise ParamsError(f"{where}: {len(problems)} problem(s):\n" + "\n".join(problems), problems)
    return params


def load_params(path: str | Path = PARAMS_FILE, head_options: Mapping[str, type[BaseModel]] | None = None
                ) -> Params:
    """Read and validate params.yaml (without head options: stages load through ercflow.check)."""
    raw, duplicates = read_params_file(path)
    params, problems = validate_params(raw, head_options)
    problems = duplicates + problems
    if problems:
        raise ParamsError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(problems), problems)
    return params


def from_dict(cls, data: Mapping[str, Any] | None, where: str):
    """Build dataclass `cls` from `data`, rejecting unknown keys and bad values, naming `where` in errors."""
    data = dict(data or {})
    model = strict_model(cls)
    try:
        m = model.model_validate(data)
    except ValidationError as e:
        problems = validation_problems(e, where, data, _json_schema(model))
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


# --- error messages ---------------------------------------------------------------------------------------

def validation_problems(error: ValidationError, prefix: str, data: Any, schema: dict) -> list[str]:
    """One line per pydantic error: the params path, then what is wrong (unknown keys list the known ones)."""
    return [_problem(e, prefix, data, schema) for e in error.errors(include_url=False)]


def _problem(e: dict, prefix: str, data: Any, schema: dict) -> str:
    loc, shown = list(e["loc"]), []
    node = data
    for el in loc:   # drop the union tags pydantic puts in `loc` (encoders.<name>.<kind>.x)
        if isinstance(node, dict) and el not in node and el in (node.get("kind", DEFAULT_FINETUNE_KIND),
                                                                node.get("head")):
            continue
        shown.append(el)
        node = node.get(el) if isinstance(node, dict) else (
            node[el] if isinstance(node, list) and isinstance(el, int) and el < len(node) else None)
    kind, ctx, value = e["type"], e.get("ctx") or {}, e.get("input")

    def join(parts) -> str:
        out = prefix
        for p in parts:
            out = f"{out}[{p}]" if isinstance(p, int) else (f"{out}.{p}" if out else str(p))
        return out

    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        parent, key = join(shown[:-1]), shown[-1]
        known = _known_keys(schema, loc[:-1])
        what = "top-level section" if not parent else "option" if parent.endswith(".options") else "key"
        hint = difflib.get_close_matches(str(key), known, n=1)
        return (f"{parent or key}: unknown {what}{'' if not parent else f' {key!r}'} (known: {', '.join(known)})"
                + (f"; did you mean {hint[0]!r}?" if hint else ""))
    path = join(shown)
    if shown and shown[-1] == "[key]":
        return f"{join(shown[:-1])}: {value!r} is not a valid name (letters, digits, _ . -; not starting with _ . -)"
    if kind == "missing":
        return f"{path}: missing (required)"
    if kind == "string_pattern_mismatch" and _walk(schema, loc).get("description"):
        return f"{path}: {value!r} is not valid ({_walk(schema, loc)['description']})"
    if kind == "literal_error":
        return f"{path}: {value!r} is not one of {ctx.get('expected')}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "")).strip("'").removesuffix("()").replace("_finetune_kind", "kind")
        expected = ", ".join(sorted(t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")))
        if kind == "union_tag_not_found":
            if not expected:
                expected = ", ".join(_tags(schema, loc))
            return f"{path}.{key}: missing (one of: {expected})"
        return f"{path}.{key}: unknown {key} {ctx.get('tag')!r} (known: {expected})"
    msg = e["msg"]
    if kind == "value_error":
        return f"{path}: {msg.removeprefix('Value error, ')}"
    msg = msg[:1].lower() + msg[1:]
    shown_value = repr(value)
    if len(shown_value) > 60:
        shown_value = shown_value[:57] + "..."
    return f"{path}: {msg} (got {shown_value})"


def _resolve(schema: dict, node: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _walk(schema: dict, loc: list) -> dict:
    node = _resolve(schema, schema)
    for el in loc:
        node = _resolve(schema, node)
        if "anyOf" in node:   # Optional[...]: the non-null branch
            node = _resolve(schema, next((b for b in node["anyOf"] if b.get("type") != "null"), {}))
        if "discriminator" in node and el in node["discriminator"].get("mapping", {}):
            node = _resolve(schema, {"$ref": node["discriminator"]["mapping"][el]})
        elif "oneOf" in node and el in _variants(schema, node):
            node = _variants(schema, node)[el]
        elif el in node.get("properties", {}):
            node = node["properties"][el]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif node.get("patternProperties"):
            node = next(iter(node["patternProperties"].values()))
        elif isinstance(node.get("items"), dict):
            node = node["items"]
        else:
            return {}
    node = _resolve(schema, node)
    if "anyOf" in node:
        node = _resolve(schema, next((b for b in node["anyOf"] if b.get("type") != "null"), {}))
    return node


def _variants(schema: dict, node: dict) -> dict[str, dict]:
    """tag -> variant of a `oneOf` whose variants have a constant `kind` (a union with a callable discriminator)."""
    out = {}
    for v in node.get("oneOf", []):
        v = _resolve(schema, v)
        const = v.get("properties", {}).get("kind", {}).get("const")
        if const is not None:
            out[const] = v
    return out


def _known_keys(schema: dict, loc: list) -> list[str]:
    return sorted(_walk(schema, loc).get("properties", {}))


def _tags(schema: dict, loc: list) -> list[str]:
    return sorted(_walk(schema, loc).get("discriminator", {}).get("mapping", {}))


# --- cross-references -------------------------------------------------------------------------------------

def _store_modality(name: str, encoders: Mapping, finetune: Mapping, kinds: Mapping[str, str]) -> str | None:
    if isinstance(encoders.get(name), dict):
        return kinds.get(encoders[name].get("kind")) or encoders[name].get("modality")
    if name in finetune:
        cfg = finetune[name] if isinstance(finetune[name], dict) else {}
        return finetune_modalities().get(cfg.get("kind", DEFAULT_FINETUNE_KIND), "text")
    return None


def _finetune_problems(teachers: list[str], distil: dict, finetune: dict) -> list[str]:
    """`teachers` are text fine-tunes on the labels (stage finetune_text reads no media); `distil.students`
    are fine-tunes of any kind against `distil.teacher`, a listed teacher (stage finetune_student)."""
    problems = []

    def cfg(n) -> dict:
        return finetune[n] if isinstance(finetune.get(n), dict) else {}

    for i, n in enumerate(teachers):
        c = cfg(n)
        kind = c.get("kind", DEFAULT_FINETUNE_KIND)
        if n in finetune and kind != DEFAULT_FINETUNE_KIND:
            problems.append(f"teachers[{i}]: {n!r} is a {kind} fine-tune: list it in distil.students (stage "
                            "finetune_text fine-tunes text teachers, which read no media)")
        elif c.get("objective", "ce") != "ce":
            problems.append(f"teachers[{i}]: {n!r} has objective {c.get('objective')!r}: a teacher learns from the "
                            "labels (ce); a student of a teacher goes in distil.students")
    students = distil.get("students")
    students = [x for x in students if isinstance(x, str)] if isinstance(students, list) else []
    teacher = distil.get("teacher")
    for i, n in enumerate(students):
        if n in students[:i]:
            problems.append(f"distil.students[{i}]: {n!r} is listed twice")
        elif n not in finetune:
            problems.append(f"distil.students[{i}]: {n!r} has no entry in finetune (defined: {sorted(finetune)})")
        elif n in teachers:
            problems.append(f"distil.students[{i}]: {n!r} is also in teachers (one stage writes a store)")
        elif n == teacher:
            problems.append(f"distil.students[{i}]: {n!r} is distil.teacher itself")
    if students and not teacher:
        problems.append("distil.teacher: missing (the teacher store the students distil from: one of teachers "
                        f"{teachers})")
    elif students and isinstance(teacher, str) and teacher not in teachers:
        problems.append(f"distil.teacher: {teacher!r} is not a fine-tuned teacher (not in teachers: {teachers}); "
                        "its store's logits are distilled")
    kinds = finetune_kinds()
    for name, c in finetune.items():
        if isinstance(c, dict) and c.get("objective") == "telme_student" and name not in students + teachers:
            problems.append(f"finetune.{name}.objective: telme_student distils distil.teacher's store: list "
                            f"'{name}' in distil.students")
        if isinstance(c, dict) and c.get("kind", DEFAULT_FINETUNE_KIND) in kinds:
            problems += filter(None, [combination_problem(kinds[c.get("kind", DEFAULT_FINETUNE_KIND)], c,
                                                          f"finetune.{name}")])
    return problems


def cross_reference_problems(raw: Mapping[str, Any], kinds: Mapping[str, str]) -> list[str]:
    """Problems between sections (read defensively: the schema reports malformed sections itself).
    `kinds`: encoder kind -> modality."""
    def names(key) -> list[str]:
        v = raw.get(key)
        return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []

    def section(v) -> dict:
        return v if isinstance(v, dict) else {}

    data, encoders, finetune = section(raw.get("data")), section(raw.get("encoders")), section(raw.get("finetune"))
    heads, features = section(raw.get("heads")), section(raw.get("features"))
    sections = {"datasets": data, "extract": encoders, "teachers": finetune, "train": heads}
    problems = []
    for key, defined in sections.items():
        section_name = {"datasets": "data", "extract": "encoders", "teachers": "finetune", "train": "heads"}[key]
        listed = names(key)
        for i, n in enumerate(listed):
            if n in listed[:i]:
                problems.append(f"{key}[{i}]: {n!r} is listed twice")
            elif n not in defined:
                problems.append(f"{key}[{i}]: {n!r} has no entry in {section_name} (defined: {sorted(defined)})")
    for n in sorted(set(encoders) & set(finetune)):
        problems.append(f"finetune.{n}: also the name of encoders.{n}; both would write data/features/<dataset>/{n}.h5")
    problems += _finetune_problems(names("teachers"), section(raw.get("distil")), finetune)

    for name, d in data.items():
        if not isinstance(d, dict):
            continue
        adapter = d.get("adapter")
        if (adapter == "sample" and name in names("datasets") and d.get("root") == f"data/raw/{name}"
                and name not in names("samples")):
            problems.append(f"data.{name}: its root data/raw/{name} is written by make_sample@{name}: list "
                            f"'{name}' in `samples`")
        if adapter == "meld" and not (d.get("root") or d.get("csv_dir")):
            problems.append(f"data.{name}.root: missing (the meld adapter needs `root`, or `csv_dir` alone for "
                            "the transcripts without clips)")
        elif adapter in ("sample", "iemocap") and not d.get("root"):
            problems.append(f"data.{name}.root: missing (required by the {adapter} adapter)")
        if adapter == "generic" and not d.get("manifest"):
            problems.append(f"data.{name}.manifest: missing (required by the generic adapter)")
        if d.get("csv_dir") is not None and adapter != "meld":
            problems.append(f"data.{name}.csv_dir: only the meld adapter reads it (adapter: {adapter})")

    sample = section(raw.get("sample"))
    for lo, hi in (("min_turns", "max_turns"), ("min_seconds", "max_seconds")):
        a, b = sample.get(lo, getattr(SampleParams, lo)), sample.get(hi, getattr(SampleParams, hi))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
            problems.append(f"sample.{hi}: {b} is below sample.{lo} ({a})")

    def pooling_problems(where: str, cfg: dict, both_ways: bool):
        pooling, fmt = cfg.get("pooling"), cfg.get("input_format")
        if pooling == "mask" and fmt != "prompt":
            problems.append(f"{where}.pooling: 'mask' pools at the prompt's <mask> token: it needs input_format "
                            f"'prompt' (not {fmt!r})")
        elif pooling == "target_mean" and fmt not in ("indi_context", "prompt"):
            problems.append(f"{where}.pooling: 'target_mean' averages the target utterance's tokens within its "
                            f"context: it needs input_format 'indi_context' or 'prompt' (not {fmt!r})")
        elif both_ways and fmt == "prompt" and pooling not in ("mask", "target_mean"):
            problems.append(f"{where}.pooling: input_format 'prompt' is pooled at its <mask> token (pooling 'mask') "
                            f"or over the target utterance's tokens ('target_mean'), not {pooling!r}")

    for name, cfg in encoders.items():
        if isinstance(cfg, dict) and cfg.get("kind") == "hf_text":
            pooling_problems(f"encoders.{name}", {"input_format": "utterance", "pooling": "cls", **cfg}, True)
    for name, cfg in finetune.items():
        if isinstance(cfg, dict) and cfg.get("kind", DEFAULT_FINETUNE_KIND) == "hf_text":
            pooling_problems(f"finetune.{name}", {"input_format": "indi_context", "pooling": "cls", **cfg}, False)

    def describe(store: str) -> str:
        if isinstance(encoders.get(store), dict):
            modality = _store_modality(store, encoders, finetune, kinds)
            return f"{'an' if modality == 'audio' else 'a'} {modality} encoder ({encoders[store].get('kind')})"
        cfg = finetune.get(store) if isinstance(finetune.get(store), dict) else {}
        if cfg.get("kind", DEFAULT_FINETUNE_KIND) == DEFAULT_FINETUNE_KIND:
            return "a text teacher (finetune)"
        modality = _store_modality(store, encoders, finetune, kinds)
        return f"{'an' if modality == 'audio' else 'a'} {modality} fine-tune (finetune, {cfg.get('kind')})"

    distil = section(raw.get("distil"))
    students = [x for x in distil.get("students", []) if isinstance(x, str)] \
        if isinstance(distil.get("students"), list) else []
    extracted, tuned = names("extract"), names("teachers") + students
    reported, storeless = set(), {}
    for h in names("train"):   # every modality of a trained head reads a store this pipeline writes
        hp = heads.get(h)
        if not isinstance(hp, dict):
            continue
        own = section(hp.get("features"))
        chosen = {**features, **own}
        modalities = hp.get("modalities", list(MODALITIES))
        for i, m in enumerate(modalities if isinstance(modalities, list) else []):
            if m not in MODALITIES:
                continue
            if m in modalities[:i]:
                problems.append(f"heads.{h}.modalities[{i}]: {m!r} is listed twice")
                continue
            if m not in chosen:
                storeless.setdefault(m, []).append(h)
                continue
            store, where = chosen[m], (f"heads.{h}.features.{m}" if m in own else f"features.{m}")
            if isinstance(store, str) and store not in extracted and store not in tuned:
                reported.add(where)
                problems.append(f"{where}: {store!r} is not extracted or fine-tuned (not in extract: {extracted} "
                                f"nor teachers: {names('teachers')}" + (f" nor distil.students: {students}"
                                                                         if students else "") + ")")
    for m, hs in storeless.items():
        problems.append(f"heads.{hs[0]}.modalities: no store for {m!r}" + (f" (nor for heads {', '.join(hs[1:])})"
                        if len(hs) > 1 else "") + f": set features.{m} (or heads.<name>.features.{m})")
    entries = [(f"features.{m}", m, s) for m, s in features.items()]
    entries += [(f"heads.{h}.features.{m}", m, s) for h, hp in heads.items() if isinstance(hp, dict)
                for m, s in section(hp.get("features")).items()]
    for where, m, store in entries:
        if not isinstance(store, str) or where in reported:
            continue
        if store not in encoders and store not in finetune:
            problems.append(f"{where}: {store!r} is neither an encoder nor a teacher (encoders: {sorted(encoders)}, "
                            f"finetune: {sorted(finetune)})")
            continue
        modality = _store_modality(store, encoders, finetune, kinds)
        if m in MODALITIES and modality in MODALITIES and modality != m:
            problems.append(f"{where}: {store!r} is {describe(store)}, not {m}")
    return problems
