"""What each store holds, and whether its stage would still write it as it is (`ercflow inspect`).

A store is *fresh* when the fingerprint its stage would compute now equals the one recorded in it. For a
feature store that is `extract`'s run fingerprint: the encoder's provenance under today's params.yaml (config,
weights id and content hash, what the model computes in, ...) and its inputs (the media store's fingerprint,
or the manifest's text columns). For a media store it is `media.decode_fingerprint`: the decode params, the
manifest, its media root and the reader `decode.reader` picks on this machine. The model is never loaded: the
encoder's own `provenance()` runs on a stand-in that carries the model's config (config.json, and the
processor's config where provenance reads it) instead of the model; the weights' content hash is computed from
the files, as `extract` does. A feature store whose media store is stale is stale too: `dvc repro` would decode
again, then extract.

Paths follow the stages' layout (pipeline/paths.py): `data/features/<D>/<E>.h5` and `data/media/<D>.h5` sit
beside `data/manifest/<D>/`, so a store's inputs are found from the store's own path.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline import paths
from pipeline.extract import TEXT_INPUT_COLUMNS, extract_inputs, run_fingerprint
from pipeline.params import as_dict
from pipeline.store import H5Store, StoreError

FRESH, STALE, NOT_IN_PARAMS, UNKNOWN, ERROR, PARTIAL = "fresh", "stale", "not in params", "unknown", "error", "partial"

# attributes `extract` / `assemble` write beside an encoder's provenance
NOT_PROVENANCE = {"dataset", "fingerprint", "inputs", "dim", "code_version", "rows", "checksums"}


class Unreadable(OSError):
    """A path that is there but cannot be read at all (permissions)."""


@dataclass
class StoreReport:
    """One store: what it holds and whether it is stale against the params."""
    path: str
    status: str                            # fresh | stale | not in params | unknown | error | partial
    reasons: list[str] = field(default_factory=list)
    kind: str | None = None                # "media", or the encoder kind (hf_text, opensmile, finetuned_text, ...)
    encoder: str | None = None             # the name under `encoders:` / `finetune:`
    dataset: str | None = None
    weights: str | None = None
    weights_hash: str | None = None        # content hash, else the hub revision
    dim: int | None = None
    rows: int | None = None
    valid: float | None = None             # share of rows not masked
    valid_by_modality: dict[str, float] | None = None   # media stores: audio, video
    compute: str | None = None             # float32 | bf16-autocast | int8-dynamic | ...
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)

    @property
    def stale(self) -> bool | None:
        return {FRESH: False, STALE: True}.get(self.status)

    @property
    def masked(self) -> int:
        return sum(1 for q in self.problems if q.get("action", "masked") == "masked")

    def to_json(self, with_problems: bool = False) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stale"] = self.stale
        out["problems"] = len(self.problems)
        out["masked"] = self.masked
        if with_problems:
            out["problem_list"] = self.problems
        return out


# -- where the stages put things ------------------------------------------------------------------

def find_stores(path: str | Path) -> list[Path]:
    """The stores a PATH names: the file itself, every `*.h5` under a folder (plus `<store>.partial` folders an
    interrupted run left without a store), or for a data folder (one with `features/` or `media/`) those two."""
    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        if partial.is_dir():
            return [partial]
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise Unreadable(f"{path}: cannot be read (permission denied)")
    if path.is_file():
        return [path]
    if (path / "features").is_dir() or (path / "media").is_dir():   # a data folder: its stores, not data/raw/
        return default_stores(path)
    found = set(p for p in path.rglob("*.h5") if p.is_file())
    found |= {p for p in path.rglob("*.h5.partial") if p.is_dir() and not p.with_suffix("").exists()}
    return sorted(found, key=_store_order)


def default_stores(data: str | Path = "data") -> list[Path]:
    """Every store the stages write under `data/`: media stores, then feature and teacher stores."""
    data = Path(data)
    out: list[Path] = []
    for folder in (data / "media", data / "features"):
        if folder.is_dir():
            out += find_stores(folder)
    return out


def _store_order(p: Path):
    return ("features" in p.parts, str(p))


@dataclass
class Layout:
    """The data folder a store belongs to (data/media/<D>.h5, data/features/<D>/<E>.h5)."""
    root: Path

    @classmethod
    def of(cls, store: Path, media: bool) -> "Layout":
        return cls(paths.data_folder_of(store, media))

    def manifest(self, dataset: str) -> Path:
        return Path(paths.manifest(dataset, data=str(self.root)))

    def media(self, dataset: str) -> Path:
        return Path(paths.media(dataset, data=str(self.root)))


# -- the fingerprints the stages would compute now --------------------------------------------------

def text_inputs_fingerprint(manifest) -> str:
    """What `extract` records as the inputs of an encoder that reads the manifest (no media)."""
    return extract_inputs(manifest, needs_media=False, media=None)


@lru_cache(maxsize=None)
def _pretrained(loader: str, path: str, revision: str | None):
    """A transformers config-like object (AutoConfig, AutoFeatureExtractor, ...): small JSON files, no weights."""
    import transformers

    return getattr(transformers, loader).from_pretrained(path, revision=revision)


def _hf_audio(enc, config, path, revision) -> None:
    enc.processor = _pretrained("AutoFeatureExtractor", path, revision)


def _hf_video(enc, config, path, revision) -> None:
    enc.num_frames = int(getattr(enc.model.config, "num_frames", 8))


# what each HF-backed kind's __init__ sets, beyond the model, that its provenance() reads
STAND_INS = {"hf_audio": _hf_audio, "hf_video": _hf_video}


def planned_provenance(name: str, raw: dict[str, Any], stored: dict[str, Any] | None = None,
                       manifest=None) -> dict[str, Any]:
    """The provenance `build_encoder(name, raw).provenance()` would give, without loading the model.

    The encoder class's own `provenance()` runs on an instance whose `__init__` is skipped: it gets its config,
    and for transformers encoders a stand-in model carrying only the model's config, the device, the compute
    precision and (for `quantize: int8`) the number of int8 layers. That number depends only on the
    architecture, which the weights fix; it is taken from `stored` (the store's attributes), since counting it
    needs the model. Raises ParamsError on bad params, and AttributeError when an encoder's provenance reads
    something its stand-in lacks (add it to STAND_INS)."""
    from pipeline.encoders import Encoder, HFEncoder, encoder_config
    from pipeline.runtime import compute_precision, resolve_device, resolve_weights

    stored = stored or {}
    cls, config = encoder_config(name, raw)
    enc = cls.__new__(cls)
    Encoder.__init__(enc, name, config)
    if issubclass(cls, HFEncoder):
        path, revision = resolve_weights(config.weights), getattr(config, "revision", None)
        enc.model = SimpleNamespace(config=_pretrained("AutoConfig", path, revision))
        enc.device = resolve_device(config.device)
        enc.compute = compute_precision(enc.device, getattr(config, "autocast", "none"),
                                        getattr(config, "quantize", "none"), f"encoders.{name}")
        n_int8 = int(stored.get("int8_layers") or 0) if enc.compute == "int8-dynamic" else 0
        enc.int8_layers = [""] * n_int8
        if cls.kind in STAND_INS:
            STAND_INS[cls.kind](enc, config, path, revision)
    return {**enc.provenance(), **(enc.manifest_provenance(manifest) if manifest is not None else {})}


def planned_teacher_provenance(name: str, raw: dict[str, Any], checkpoint: str, labels: list[str]) -> dict[str, Any]:
    """The provenance `write_store` (pipeline/finetune/store_writer.py) gives the teacher store of
    `finetune.<name>` whose best checkpoint is at `checkpoint` (as recorded in the store), with the checkpoint's content hash as it is now."""
    from pipeline.runtime import weights_hash
    from pipeline.configs import TextFinetuneParams
    from pipeline.finetune.objectives import CrossEntropy
    from pipeline.finetune.store_writer import FinetunedEncoder, FinetunedTextEncoder
    from pipeline.params import from_dict

    p = from_dict(TextFinetuneParams, raw, f"finetune.{name}")
    # a LoRA teacher's store records its base weights' hash and objective too (store_writer.finetuned_encoder)
    cls = FinetunedTextEncoder if p.lora is None else FinetunedEncoder
    enc = cls.__new__(cls)
    enc.name, enc.config, enc.checkpoint = name, p, Path(checkpoint)
    enc.kind, enc.modality, enc.needs_media = "finetuned_text", "text", False
    enc.tuner = SimpleNamespace(p=p, labels=list(labels), objective=CrossEntropy())
    enc.ckpt_hash = weights_hash(str(checkpoint))
    return enc.provenance()


# -- explaining a difference -------------------------------------------------------------------------

def _norm(v):
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def _show(v) -> str:
    return "(none)" if v is None else json.dumps(v, default=str) if not isinstance(v, str) else v


def changes(planned: dict[str, Any], stored: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: stored -> planned` for each key that differs (dicts compared key by key, missing = None)."""
    out = []
    for k in sorted(set(planned) | set(stored)):
        a, b = _norm(stored.get(k)), _norm(planned.get(k))
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(b, a, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}: {_show(a)} -> {_show(b)}")
    return out


def provenance_changes(planned: dict[str, Any], attrs: dict[str, Any]) -> list[str]:
    stored = {k: v for k, v in attrs.items() if k not in NOT_PROVENANCE}
    out = changes(planned, stored)
    if any(c.startswith("config.") for c in out):   # said once: `weights` repeats `config.weights`
        out = [c for c in out if not c.startswith("config_hash:") and f"config.{c}" not in out]
    return out


# -- inspecting -------------------------------------------------------------------------------------

class Inspector:
    """Reports on stores against one params object (None, with `params_error`, when it could not be read)."""

    def __init__(self, params=None, params_error: str | None = None):
        self.params, self.params_error = params, params_error
        self._manifests: dict[Path, Any] = {}
        self._media: dict[Path, tuple[str | None, list[str]]] = {}

    def inspect(self, path: str | Path) -> StoreReport:
        report, attrs = self._read(Path(path))
        if attrs is not None:
            try:
                self._judge(Path(path), report, attrs)
            except Exception as e:   # params, manifest or weights that cannot be read: say so on the row
                report.status, report.reasons = UNKNOWN, [f"cannot tell: {type(e).__name__}: {_short(e)}"]
            if report.kind == "media" and report.status in (FRESH, STALE):   # its feature stores ask again
                self._media[Path(path).resolve()] = (attrs.get("fingerprint"),
                                                     report.reasons if report.status == STALE else [])
        return report

    def _read(self, path: Path) -> tuple[StoreReport, dict[str, Any] | None]:
        """What the store holds, and its attributes (None: not a store; the report says why)."""
        if path.name.endswith(".h5.partial") and path.is_dir():
            chunks = len(list(path.glob("chunk_*.npz")))
            return StoreReport(str(path.with_suffix("")), PARTIAL,
                               [f"an interrupted run left {chunks} finished chunk(s) in {path.name} and no store; "
                                "re-run its stage to resume"]), None
        if not os.access(path, os.R_OK):
            raise Unreadable(f"{path}: cannot be read (permission denied)")
        try:   # H5Store refuses a file that is not a complete ercflow store, saying why and what to do
            with H5Store(path) as store:
                attrs = store.attrs
                if "encoder" not in attrs and attrs.get("kind") != "media":
                    return StoreReport(str(path), ERROR, ["not an ercflow feature or media store (no `encoder` or "
                                                          "`kind` attribute)"]), None
                return self._describe(path, store), attrs
        except StoreError as e:
            return StoreReport(str(path), ERROR, [_without_path(str(e), path)]), None
        except Exception as e:   # whatever else a damaged file raises: a row, not a traceback
            return StoreReport(str(path), ERROR, [f"damaged store ({type(e).__name__}: {_short(e)})"]), None

    def _describe(self, path: Path, store: H5Store) -> StoreReport:
        a, f = store.attrs, store.file
        n = len(store.utt_ids)
        valid = f["valid"][:].astype(bool) if "valid" in f else None
        report = StoreReport(str(path), UNKNOWN, dataset=a.get("dataset"), rows=n, problems=store.problems(),
                             valid=float(valid.mean()) if valid is not None and n else None)
        if a.get("kind") == "media":
            report.kind = "media"
            report.weights = (f"{a.get('decoder')}: text only" if a.get("text_only") else
                              f"{a.get('decoder')} {a.get('sample_rate')} Hz, "
                              f"{a.get('frames')}x{a.get('frame_size')}px")
            report.valid_by_modality = {m: float(f[f"{m}_valid"][:].mean()) for m in ("audio", "video")
                                        if f"{m}_valid" in f and n}
            report.details = {k: a.get(k) for k in ("sample_rate", "frames", "frame_size", "decoder", "decoder_version",
                                                      "text_only", "code_version")}
            return report
        report.kind, report.encoder = a.get("encoder_kind"), a.get("encoder")
        report.weights = a.get("weights")
        report.weights_hash = a.get("weights_hash") or a.get("weights_revision")
        report.dim = int(a["dim"]) if "dim" in a else int(f["pooled"].shape[-1]) if "pooled" in f else None
        report.compute = a.get("compute")
        report.details = {k: a.get(k) for k in ("modality", "model_type", "layers", "code_version") if k in a}
        if isinstance(a.get("config"), dict) and a["config"].get("lora"):   # a LoRA adapter: `weights_hash` is
            report.details.update(adapter=True, base_weights=a.get("base_weights"),   # the adapter's checkpoint
                                  base_weights_hash=a.get("base_weights_hash"))
        report.details.update(logits="logits" in f, sequence="seq" in f)
        return report

    def _judge(self, path: Path, report: StoreReport, attrs: dict[str, Any]) -> None:
        """Set `report.status` / `reasons`: would the stage write this store again under the params?"""
        if self.params is None:
            report.status, report.reasons = UNKNOWN, [self.params_error or "no params"]
            return
        media = report.kind == "media"
        dataset = report.dataset or (path.stem if media else path.parent.name)
        if dataset not in (self.params.data or {}):
            report.status, report.reasons = NOT_IN_PARAMS, [f"data.{dataset}: dataset not in params"]
            return
        layout = Layout.of(path, media)
        manifest = self._manifest(layout.manifest(dataset))
        if media:
            from pipeline.media import decode_fingerprint, pick_reader

            decode = self.params.decode
            reader = pick_reader(getattr(decode, "reader", "auto")).name   # what decode would read with here
            if decode_fingerprint(manifest, decode, reader, cache_from=path) == attrs.get("fingerprint"):
                report.status = FRESH
                return
            report.status = STALE
            report.reasons = [f"decode.{c}" for c in changes(as_dict(decode), attrs.get("decode_config") or {})]
            if reader != attrs.get("decoder"):
                report.reasons.append(f"reader: {attrs.get('decoder')} -> {reader} (on this machine)")
            if not report.reasons:
                with H5Store(path) as store:
                    same_rows = store.utt_ids == manifest.utt_ids
                report.reasons = [f"the manifest's utterances changed ({report.rows} rows in the store, "
                                  f"{len(manifest)} in {layout.manifest(dataset)})" if not same_rows else
                                  f"the rows of {layout.manifest(dataset)}, its media root, a media file's content, "
                                  f"or the way decode fingerprints its store (this store: code {attrs.get('code_version')}) changed"]
            return
        name, teacher = report.encoder, report.kind == "finetuned_text"
        section = "finetune" if teacher else "encoders"
        raw = (getattr(self.params, section, None) or {}).get(name)
        if raw is None:
            report.status, report.reasons = NOT_IN_PARAMS, [f"{section}.{name}: not in params"]
            return
        raw = as_dict(raw)
        upstream: list[str] = []
        if teacher:
            checkpoint = str(attrs.get("weights"))
            planned = planned_teacher_provenance(name, raw, checkpoint, manifest.meta.labels)
            if not Path(checkpoint).exists():
                upstream.append(f"its checkpoint {checkpoint} is missing "
                                f"({paths.stage_name(paths.FINETUNE_TEXT, dataset, name)} would train again)")
            needs_media = False
        else:
            from pipeline.encoders import ENCODERS

            planned = planned_provenance(name, raw, attrs, manifest)
            needs_media = ENCODERS[raw["kind"]].needs_media
        if needs_media:
            media_path = layout.media(dataset)
            if not media_path.exists():
                report.status, report.reasons = UNKNOWN, [f"its media store {media_path} is missing"]
                return
            inputs, media_reasons = self._media_state(media_path)
            if media_reasons:
                upstream.append(f"its media store {media_path} is stale ({'; '.join(media_reasons)})")
        else:
            inputs = text_inputs_fingerprint(manifest)
        if run_fingerprint(planned, inputs) == attrs.get("fingerprint") and not upstream:
            report.status = FRESH
            return
        reasons = provenance_changes(planned, attrs)
        if inputs != attrs.get("inputs"):
            reasons.append("inputs changed: " + (f"the media store {layout.media(dataset)} was decoded again"
                                                 if needs_media else
                                                 f"the manifest's {', '.join(TEXT_INPUT_COLUMNS)} changed"))
        report.status = STALE
        report.reasons = reasons + upstream or ["the fingerprint differs (this code computes provenance "
                                                "differently from the code that wrote the store)"]

    def _manifest(self, folder: Path):
        from pipeline.manifest import Manifest

        if folder not in self._manifests:
            if not (folder / "manifest.csv").exists():
                raise FileNotFoundError(f"no manifest at {folder} (run {paths.PREPARE})")
            self._manifests[folder] = Manifest.load(folder)
        return self._manifests[folder]

    def _media_state(self, media_path: Path) -> tuple[str | None, list[str]]:
        """(the media store's fingerprint, why it is stale: [] when it is not)."""
        key = media_path.resolve()
        if key not in self._media:
            report, attrs = self._read(media_path)
            if attrs is None:
                raise RuntimeError(f"its media store is unusable: {'; '.join(report.reasons)}")
            self._judge(media_path, report, attrs)
            self._media[key] = (attrs.get("fingerprint"), report.reasons if report.status == STALE else [])
        return self._media[key]


def _without_path(msg: str, path: Path) -> str:
    return msg[len(f"{path}: "):] if msg.startswith(f"{path}: ") else msg


def _short(e: BaseException, limit: int = 200) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if len(msg) <= limit else msg[:limit] + "..."
