"""The fine-tune kinds (`finetune.<name>.kind`, the `FINETUNERS` registry): what each loads and how it turns
manifest rows into a batch; the loop they share is pipeline/finetune/loop.py.

- `hf_text` (`TextFinetuner`): the text teacher. The papers' text branch is a fine-tuned encoder (DialogueTRM:
  BERT on `indi_context`; TelME, arXiv 2401.12987: RoBERTa on `prompt`, the teacher its students distil from);
  the pooled token (cls / mean / the prompt's mask) feeds a linear layer.
- `hf_audio` (`AudioFinetuner`): a speech encoder (TelME's audio student: data2vec-audio), its frames mean-pooled
  over the model's own frame mask; waveforms from the media store, prepared by the `hf_audio` encoder's processor
  (pipeline/encoders/audio.py), too short / silent / undecodable audio masked as that encoder masks it.
- `hf_video` (`VideoFinetuner`): a video transformer (TelME's visual student: TimeSformer) on `num_frames` of the
  media store's frames prepared by the `hf_video` encoder's image processor (pipeline/encoders/visual.py).

An audio or video kind takes the very model and processor the extraction encoder of its kind loads, so the
fine-tuned store and the frozen one see the same inputs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from pipeline.configs import AudioFinetuneParams, FinetuneBase, TextFinetuneParams, VideoFinetuneParams
from pipeline.encoders.text import load_text_model, text_inputs, tokenize_pairs
from pipeline.finetune.llm import decoder_weights, setup_decoder
from pipeline.finetune.lora import adapted
from pipeline.finetune.loop import Finetuner
from pipeline.finetune.models import AudioClassifier, TextClassifier, VideoClassifier
from pipeline.finetune.objectives import Objective
from pipeline.manifest import Manifest
from pipeline.params import ParamsError
from pipeline.registry import Registry

FINETUNERS: Registry[type[Finetuner]] = Registry("fine-tune kind")


@FINETUNERS.register("hf_text")
class TextFinetuner(Finetuner):
    """The text teacher: `TextClassifier` on the manifest's text in the configured input format."""
    kind, modality, store_kind = "hf_text", "text", "finetuned_text"
    p: TextFinetuneParams

    def setup(self) -> None:
        p = self.p
        if decoder_weights(p.weights, p.revision):   # a decoder-only LLM (pipeline/finetune/llm.py)
            return setup_decoder(self)
        self.tokenizer, encoder = load_text_model(p.weights, p.revision, p.input_format, p.speaker_tokens)
        self.gradient_checkpointing(encoder)
        encoder = adapted(self, encoder)   # LoRA adapters when params say `lora` (pipeline/finetune/lora.py)
        torch.manual_seed(p.seed)
        self.model = TextClassifier(encoder, len(self.labels), p.pooling, self.tokenizer.mask_token_id, p.dropout,
                                    self.d_out())
        self.model.to(self.device)
        rows = np.arange(len(self.manifest))
        pairs = text_inputs(self.manifest, rows, p.input_format, p.context_window, p.speaker_tokens,
                            sep=self.tokenizer.sep_token or "</s>", mask=self.tokenizer.mask_token or "<mask>")
        self.encoded = tokenize_pairs(self.tokenizer, pairs, p.input_format, p.max_length)
        self.lengths = np.array([len(e["input_ids"]) for e in self.encoded], np.int64)

    def data_identity(self):
        rows = self.manifest.rows
        identity = rows[[c for c in ("utt_id", "text", "label", "split") if c in rows]].to_dict("list")
        if self.p.input_format == "utterance":   # the inputs follow from the text and params alone
            return identity
        # a context or instruction input also reads dialogue order, turns and speaker names: the token ids the
        # model is fed enter the fingerprint, so that renamed speakers or reordered turns start over
        ids = hashlib.sha256()
        for e in self.encoded:
            ids.update(np.asarray(e["input_ids"], np.int64).tobytes() + b"|")
        return {**identity, "input_ids": ids.hexdigest()}

    def checkpoint_info(self) -> dict:
        info = {"pooling": self.p.pooling, "input_format": self.p.input_format}
        return info if self.objective.name == "ce" else {**info, "objective": self.objective.name}

    def collate(self, rows: np.ndarray) -> dict:
        batch = self.tokenizer.pad([self.encoded[i] for i in rows], return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def save_encoder_extras(self, path: Path) -> None:
        self.tokenizer.save_pretrained(path)


class MediaFinetuner(Finetuner):
    """An audio or video encoder fine-tuned on the media store's decoded media."""
    needs_media = True

    def data_identity(self):
        rows = self.manifest.rows
        return {"media": self.media.attrs["fingerprint"],
                "rows": rows[[c for c in ("utt_id", "label", "split") if c in rows]].to_dict("list")}

    def place(self, encoder_obj, classifier_cls, **kw) -> None:
        """Take the model and processor that the extraction encoder `encoder_obj` loaded (the very path the
        frozen store's encoder takes), wrap the model in `classifier_cls` for training."""
        self.processor = encoder_obj.processor
        backbone = encoder_obj.model
        self.gradient_checkpointing(backbone)
        backbone = adapted(self, backbone)   # LoRA adapters when params say `lora`
        torch.manual_seed(self.p.seed)
        self.model = classifier_cls(backbone, len(self.labels), dropout=self.p.dropout, d_out=self.d_out(), **kw)
        self.model.to(self.device)

    def save_encoder_extras(self, path: Path) -> None:
        self.processor.save_pretrained(path)


@FINETUNERS.register("hf_audio")
class AudioFinetuner(MediaFinetuner):
    """A speech encoder fine-tuned on the media store's 16 kHz audio (`AudioClassifier`)."""
    kind, modality, store_kind = "hf_audio", "audio", "finetuned_audio"
    p: AudioFinetuneParams

    def setup(self) -> None:
        from pipeline.configs import HFAudioConfig
        from pipeline.encoders.audio import HFAudioEncoder, unusable_audio
        from pipeline.problems import masked_problem

        p = self.p
        enc = HFAudioEncoder("finetune", HFAudioConfig(weights=p.weights, revision=p.revision, device=p.device,
                                                       autocast=p.autocast, max_seconds=p.max_seconds,
                                                       min_seconds=p.min_seconds, silence_dbfs=p.silence_dbfs))
        self.sr = int(self.media.attrs["sample_rate"])
        if self.sr != enc.processor.sampling_rate:
            raise ParamsError(f"finetune ({p.weights}): the model expects {enc.processor.sampling_rate} Hz audio, the "
                              f"media store holds {self.sr} Hz (set decode.sample_rate)")
        self.prepare = enc.prepare   # the hf_audio encoder's own input preparation (normalise, pad, mask)
        self.place(enc, AudioClassifier)
        self.max_samples = int(p.max_seconds * self.sr)
        ids = self.manifest.utt_ids
        ok = self.media.fixed("audio_valid", ids).astype(bool)
        self.lengths = np.zeros(len(ids), np.int64)
        for i, ((_, r), good) in enumerate(zip(self.manifest.rows.iterrows(), ok)):
            reason = "audio masked at decode" if not good else None
            if good:   # what the hf_audio encoder masks, masked here too (read once; not kept in memory)
                x = self.wave(i)
                reason = unusable_audio(x, self.sr, p.min_seconds, p.silence_dbfs)
                self.lengths[i] = len(x)
            if reason:
                self.usable[i] = False
                self.problems.append(masked_problem(r, r.get("audio", ""), reason, "audio"))

    def wave(self, row: int) -> np.ndarray:
        return self.media.audio(self.manifest.utt_ids[row])[: self.max_samples]

    def collate(self, rows: np.ndarray) -> dict:
        inputs = self.prepare([self.wave(i) for i in rows], self.sr)
        return {k: v.to(self.device) for k, v in inputs.items()}


@FINETUNERS.register("hf_video")
class VideoFinetuner(MediaFinetuner):
    """A video transformer fine-tuned on the media store's frames (`VideoClassifier`)."""
    kind, modality, store_kind = "hf_video", "visual", "finetuned_video"
    p: VideoFinetuneParams

    def setup(self) -> None:
        from pipeline.configs import HFVideoConfig
        from pipeline.encoders.visual import HFVideoEncoder, decoded_video, sample_frames

        p = self.p
        enc = HFVideoEncoder("finetune", HFVideoConfig(weights=p.weights, revision=p.revision, pooling=p.pooling,
                                                       device=p.device, autocast=p.autocast))
        self.num_frames, self.sample_frames = enc.num_frames, sample_frames
        self.place(enc, VideoClassifier, pooling=p.pooling)
        _, valid, self.problems = decoded_video(self.manifest.rows, self.media)
        self.usable = valid.astype(bool)
        self.lengths = np.zeros(len(self.manifest), np.int64)   # every clip is num_frames long

    def collate(self, rows: np.ndarray) -> dict:
        ids = self.manifest.utt_ids
        videos = [list(self.sample_frames(self.media.frames(ids[i]), self.num_frames)) for i in rows]
        return {"pixel_values": self.processor(videos, return_tensors="pt")["pixel_values"].to(self.device)}


def build_finetuner(manifest: Manifest, p: FinetuneBase, ckpt_dir: str | Path, media_path: str | Path | None = None,
                    objective: Objective | None = None) -> Finetuner:
    """The fine-tuner of `p.kind` (hf_text | hf_audio | hf_video); `objective` defaults to `ce`."""
    return FINETUNERS.get(getattr(p, "kind", "hf_text"))(manifest, p, ckpt_dir, media_path, objective)
