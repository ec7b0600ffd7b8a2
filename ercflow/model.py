"""A trained head (its model bundle) run on new conversations: `load_model(path).predict(table)`, the library
behind `ercflow predict` (ercflow/predict.py). The pipeline run on a table instead of a dataset, through the
very functions the stages call:

    table (CSV/TSV/JSONL, or a DataFrame: dialogue_id, turn, speaker, text [, utt_id, video, audio, start, end])
      -> manifest (pipeline/manifest.py; media paths must stay inside the media root)
      -> media store (pipeline/media.decode_dataset, with the decode config of the model's training stores),
         only when an encoder reads media
      -> feature stores (pipeline/extract.extract; each encoder rebuilt from the kind and config its training
         store records, a fine-tuned teacher or student from its checkpoint), each weights' content hash checked
      -> the head over each dialogue in turn order, features standardised with the training statistics that
         the bundle keeps.

The stores are written into a work dir keyed by the input (pipeline/paths.py: `predict_root`), so a second
call on the same input reuses them (each store is also checked against its fingerprint, as in the pipeline).
It needs both pipeline/ and heads/, so it lives a layer above them, in ercflow/.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import UserError, paths
from pipeline.extract import extract
from pipeline.manifest import Manifest, ManifestError, ManifestMeta, OutsideRootError
from pipeline.metrics import prediction_table
from pipeline.store import atomic_write_text, fingerprint, writer_lock

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("dialogue_id", "turn", "speaker", "text")
OPTIONAL_COLUMNS = ("utt_id", "video", "audio", "start", "end")
TEACHER_KIND = "finetuned_text"
STUDENT_KINDS = ("finetuned_audio", "finetuned_video")   # stores of stage finetune_student


class WeightsMismatch(UserError):
    """An encoder's weights on this machine are not the ones the model was trained on."""


def read_conversations(source: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The input table and a name for it in messages."""
    if isinstance(source, pd.DataFrame):
        return source.copy(), "the input table"
    from pipeline.datasets.generic import read_table

    try:
        return read_table(Path(source)), str(source)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"{source}: not a readable conversation table ({str(e).splitlines()[0]}); give a CSV, "
                            "TSV or JSONL file with dialogue_id, turn, speaker, text") from e


def conversation_manifest(df: pd.DataFrame, where: str, media_root: str | Path | None,
                          labels: list[str], allow_outside_root: bool = False) -> Manifest:
    """The table as an unlabelled manifest (one split, `test`); `utt_id` defaults to `<dialogue_id>_<turn>`."""
    missing = [c for c in INPUT_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{where}: lacks column(s) {missing}; a conversation table has "
                            f"{', '.join(INPUT_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)})")
    if df.empty:
        raise ManifestError(f"{where}: no utterances (the table has a header and no rows)")
    ignored = sorted(set(df.columns) - set(INPUT_COLUMNS) - set(OPTIONAL_COLUMNS))
    if ignored:
        log.info("%s: columns not used for prediction: %s", where, ", ".join(ignored))
    df = df[[c for c in INPUT_COLUMNS + OPTIONAL_COLUMNS if c in df.columns]].copy()
    for col in ("dialogue_id", "speaker", "text", "video", "audio", "utt_id"):
        if col in df.columns:
            df[col] = df[col].where(df[col].notna(), "").astype(str)
    if "utt_id" not in df.columns:
        df["utt_id"] = df["dialogue_id"] + "_" + df["turn"].astype(str)
    names_media = any(col in df.columns and (df[col] != "").any() for col in ("video", "audio"))
    if names_media and media_root is None:
        raise ManifestError(f"{where}: rows name media files (video/audio): give the folder they are relative "
                            "to (--media-root)")
    df["split"], df["dataset"] = "test", "predict"
    meta = ManifestMeta("predict", str(media_root) if media_root is not None else None, labels=list(labels),
                        allow_outside_root=allow_outside_root, unlabelled=True)
    try:
        return Manifest(df, meta)
    except OutsideRootError as e:   # the manifest's advice names a params key; predict has a flag
        raise ManifestError(f"{where}: {e.details}. Media paths must stay inside --media-root; pass "
                            "--allow-outside-root (allow_outside_root=True in Python) only for a table you "
                            "trust") from None


class Model:
    """A trained head with what it needs to predict on new conversations (`load_model(path)`)."""

    def __init__(self, path: str | Path, device: str = "auto", work_dir: str | Path | None = None,
                 allow_weights_mismatch: bool = False):
        from heads.bundle import load_head, load_trained_head
        from pipeline.runtime import resolve_device

        self.path = Path(path)
        _, self.meta = load_head(self.path)
        self.head = load_trained_head(self.path)
        self.device = resolve_device(device)
        self.device_name = device
        self.head.to(self.device)
        self.work_root = Path(work_dir) if work_dir is not None else paths.predict_root()
        self.allow_weights_mismatch = allow_weights_mismatch
        recipes = self.meta.get("features") or {}
        lacking = [m for m in self.head.modalities if "encoder_kind" not in recipes.get(m, {})]
        if lacking or "normalization" not in self.meta:
            raise UserError(f"{self.path}: this bundle does not say how to compute its inputs "
                            f"({', '.join(lacking) or 'normalization'} missing); re-run its train stage with this "
                            "ercflow to predict with it")

    @property
    def labels(self) -> list[str]:
        return list(self.meta.get("labels") or [])

    # -- the pipeline on a table ----------------------------------------------------------------------
    def work_dir(self, manifest: Manifest) -> Path:
        cols = [c for c in manifest.rows.columns if c not in ("split", "dataset")]
        key = fingerprint({"rows": manifest.rows[cols].to_dict("list"), "root": manifest.meta.root})
        return self.work_root / key

    def stores(self, manifest: Manifest, work: Path) -> tuple[dict[str, str], list[dict]]:
        """Each modality's feature store for `manifest` in `work` (computed, or reused when up to date) and
        the problems met (decode's and the encoders')."""
        recipes = {m: self.meta["features"][m] for m in self.head.modalities}
        students = [m for m, r in recipes.items() if r["encoder_kind"] in STUDENT_KINDS]
        # every other encoder first: a weights mismatch is found before a long decode; a student reads the
        # decoded media as soon as it is built
        encoders = {m: self.encoder(m, r, manifest) for m, r in recipes.items() if m not in students}
        problems: list[dict] = []
        media_path = None
        media = self.media_modalities
        if media:
            from pipeline.media import decode_dataset
            from pipeline.params import DecodeParams, from_dict

            if len({fingerprint(recipes[m]["decode_config"]) for m in media}) > 1:
                raise UserError(f"{self.path}: its media encoders read media decoded with different configs")
            media_path = paths.predict_media(work)
            summary = decode_dataset(manifest, media_path, from_dict(DecodeParams, recipes[media[0]]["decode_config"],
                                                                     "decode (from the bundle)"))
            problems += summary["problems"]
        encoders.update({m: self.encoder(m, recipes[m], manifest, media_path) for m in students})
        store_paths = {}
        try:
            for m, enc in encoders.items():
                out = paths.predict_features(work, enc.name, recipes[m].get("config_hash", "x"))
                summary = extract(manifest, enc, out, media_path)
                problems += [q for q in summary["problems"] if q.get("modality") in (None, m)
                             or q.get("action") != "masked" or "decode" not in q.get("problem", "")]
                store_paths[m] = str(out)
        finally:
            for m in students:
                encoders[m].tuner.close()
        return store_paths, problems

    def encoder(self, modality: str, recipe: dict, manifest: Manifest, media_path: Path | None = None):
        """The encoder that made the training store of `modality`, rebuilt from its recipe; its weights' hash
        must be the recorded one."""
        from pipeline.encoders import build_encoder

        name, kind = recipe["encoder"], recipe["encoder_kind"]
        if kind == TEACHER_KIND:
            enc = self.teacher(name, recipe, manifest)
        elif kind in STUDENT_KINDS:
            enc = self.student(modality, name, recipe, manifest, media_path)
        else:
            config = dict(recipe["config"])
            if "device" in config:
                config["device"] = self.device_name
                if config.get("runtime") == "onnx":   # ONNX Runtime runs on a CPU: as the training store was made
                    config["device"] = "cpu"
                    if self.device_name != "cpu":
                        log.info("encoder '%s' runs with ONNX Runtime on the CPU (runtime: onnx, as its training "
                                 "store was computed); the rest on %s", name, self.device_name)
            enc = build_encoder(name, {"kind": kind, **config})
        got, want = enc.provenance().get("weights_hash"), recipe.get("weights_hash")
        if want and got != want:
            msg = (f"{self.path}: encoder '{name}' ({modality}) was trained with weights of content hash {want}, "
                   f"but {recipe.get('weights')} here hashes to {got}")
            if not self.allow_weights_mismatch:
                raise WeightsMismatch(msg + "; use the same weights, or --allow-weights-mismatch to go on anyway")
            log.warning("%s (going on: --allow-weights-mismatch)", msg)
        return enc

    def checkpoint(self, recipe: dict, what: str) -> Path:
        """The fine-tune checkpoint a store was written from: its path as recorded, relative to the working
        directory or to the project the bundle lives in (`models/<dataset>/<head>.safetensors` -> the folder
        above models/: pipeline/paths.py)."""
        checkpoint = Path(recipe["weights"])
        if not checkpoint.is_absolute() and not checkpoint.exists():
            checkpoint = paths.project_of_bundle(self.path) / checkpoint
        if not checkpoint.is_dir():
            raise UserError(f"{self.path}: its {what} at {recipe['weights']}, which is not here (dvc pull it, or run "
                            "from the project that has it)")
        return checkpoint

    def teacher(self, name: str, recipe: dict, manifest: Manifest):
        """A fine-tuned teacher from its checkpoint."""
        from pipeline.configs import TextFinetuneParams
        from pipeline.finetune.kinds import TextFinetuner
        from pipeline.finetune.store_writer import finetuned_encoder
        from pipeline.params import from_dict

        checkpoint = self.checkpoint(recipe, "text input is the fine-tuned teacher")
        config = {**recipe["config"], "device": self.device_name}
        p = from_dict(TextFinetuneParams, config, f"teacher {name} (from the bundle)")
        manifest.meta.labels = list(recipe.get("labels") or self.labels)
        tuner = TextFinetuner(manifest, p, checkpoint.parent)
        self.check_base(name, "text", recipe, tuner)
        tuner.load(checkpoint.name)
        return finetuned_encoder(name, tuner, Path(recipe["weights"]), weights_dir=checkpoint)

    def check_base(self, name: str, modality: str, recipe: dict, tuner) -> None:
        """A LoRA fine-tune (its checkpoint an adapter) runs on the base weights it was trained on: their content
        hash here must be the recorded one (pipeline/finetune/lora.py)."""
        want, got = recipe.get("base_weights_hash"), getattr(tuner, "base_hash", None)
        if tuner.p.lora is None or not want or got == want:
            return
        msg = (f"{self.path}: encoder '{name}' ({modality}) is a LoRA adapter trained on base weights of content "
               f"hash {want}, but {tuner.p.weights} here hashes to {got}")
        if not self.allow_weights_mismatch:
            raise WeightsMismatch(msg + "; use the same base weights, or --allow-weights-mismatch to go on anyway")
        log.warning("%s (going on: --allow-weights-mismatch)", msg)
        tuner.base_hash = want   # the adapter then loads onto these weights

    def student(self, modality: str, name: str, recipe: dict, manifest: Manifest, media_path: Path | None):
        """A fine-tuned audio / video encoder (stage finetune_student) from its checkpoint. The model is built
        from the checkpoint's own encoder folder (config, weights, processor), so the base weights need not be
        on this machine; its feature size is the head's input size for `modality` (a TelME student projects
        to its teacher's size)."""
        import heads.telme_students  # noqa: F401  (registers the telme_student objective)
        from pipeline.configs import FINETUNE_CONFIGS
        from pipeline.finetune.kinds import build_finetuner
        from pipeline.finetune.objectives import OBJECTIVES, TrainedObjective
        from pipeline.finetune.store_writer import finetuned_encoder
        from pipeline.params import from_dict

        kind = {"finetuned_audio": "hf_audio", "finetuned_video": "hf_video"}[recipe["encoder_kind"]]
        checkpoint = self.checkpoint(recipe, f"{modality} input is the fine-tuned {kind[3:]} encoder '{name}' "
                                             "(stage finetune_student)")
        config = {**recipe["config"], "kind": kind, "weights": str(checkpoint / "encoder"), "revision": None,
                  "device": self.device_name}
        if recipe["config"].get("lora"):   # the checkpoint holds an adapter: the base weights it was trained on
            config.update(weights=recipe["config"]["weights"], revision=recipe["config"].get("revision"))
        p = from_dict(FINETUNE_CONFIGS[kind], config, f"student {name} (from the bundle)")
        manifest.meta.labels = list(recipe.get("labels") or self.labels)
        trained_with = recipe.get("objective", "ce")
        OBJECTIVES.get(trained_with, f"student {name} (from the bundle)")   # an objective this ercflow knows
        objective = TrainedObjective(trained_with, int(self.head.dims[modality]))
        tuner = build_finetuner(manifest, p, checkpoint.parent, media_path, objective)
        self.check_base(name, modality, recipe, tuner)
        tuner.load(checkpoint.name)
        return finetuned_encoder(name, tuner, Path(recipe["weights"]), weights_dir=checkpoint)

    # -- predictions ----------------------------------------------------------------------------------
    def outputs(self, manifest: Manifest, stores: dict[str, str], batch_dialogues: int = 8
                ) -> tuple[np.ndarray, np.ndarray]:
        """(manifest rows, raw head outputs [n, C]) of every utterance, dialogue by dialogue."""
        from heads.data import CachedDialogues
        from heads.trainer import predict

        stats = {m: (np.asarray(s["mean"], np.float32), np.asarray(s["std"], np.float32))
                 for m, s in self.meta["normalization"].items()}
        data = CachedDialogues(manifest, stores, normalize=bool(stats), stats=stats)
        return predict(self.head, data, "test", batch_dialogues, self.device)

    @property
    def media_modalities(self) -> list[str]:
        """The head's modalities whose stores an encoder computes from decoded media."""
        return [m for m in self.head.modalities if self.meta["features"][m].get("modality") in ("audio", "visual")]

    @property
    def needs_media(self) -> bool:
        return bool(self.media_modalities)

    def predict(self, table: str | Path | pd.DataFrame, media_root: str | Path | None = None,
                allow_outside_root: bool = False) -> pd.DataFrame:
        """One row per utterance: utt_id, dialogue_id, turn, speaker, prediction, one probability column per
        class `p_<label>` (or one column per dimension), and `problems` (masked inputs, `;`-separated)."""
        df, where = read_conversations(table)
        if not self.needs_media:   # a text-only model: media columns are not its input
            df = df.drop(columns=[c for c in ("video", "audio", "start", "end") if c in df.columns])
        manifest = conversation_manifest(df, where, media_root, self.labels, allow_outside_root)
        work = self.work_dir(manifest)
        work.mkdir(parents=True, exist_ok=True)
        with writer_lock(work):   # one predict per work dir: a second call on the same input waits, then reuses
            manifest.save(paths.predict_manifest(work))
            stores, problems = self.stores(manifest, work)
            rows, out = self.outputs(manifest, stores)
            result = prediction_table(manifest.rows.loc[rows], out, self.head.task, self.labels,
                                      list(self.meta.get("dimensions") or []))
            for i, col in enumerate(("dialogue_id", "turn", "speaker"), start=1):
                result.insert(i, col, manifest.rows.loc[rows, col].to_numpy())
            notes: dict[str, list[str]] = {}
            for q in problems:
                notes.setdefault(q["utt_id"], []).append(f"{q.get('modality') or 'input'}: {q['problem']}")
            result["problems"] = ["; ".join(dict.fromkeys(notes.get(u, []))) for u in result["utt_id"]]
            atomic_write_text(paths.predict_table(work), result.to_csv(index=False))
        return result


def load_model(path: str | Path, **kwargs) -> Model:
    """A trained model bundle (`models/<dataset>/<head>.safetensors`) ready to `predict(table)`."""
    return Model(path, **kwargs)
