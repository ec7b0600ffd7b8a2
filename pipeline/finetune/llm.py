"""A decoder-only LLM as the text teacher (`finetune.<name>` of kind hf_text whose weights are a causal-LM
family: Llama, Qwen2/3, Mistral, Gemma, GPT-2, ...), usually with `lora` (pipeline/finetune/lora.py).

Input: the `instruction` prompt (pipeline/prompts.py: speaker-tagged history within `max_length` tokens, the
label words named, a question ending at the answer position), or `utterance` / `indi_context`; left-padded, with
position ids counted over the real tokens (pipeline/encoders/text.py), so padding changes no output.

What is trained (`classifier`):
- `label_words` (the default with `instruction`): the logits are each label word's log-probability as the
  answer, from the LLM's own LM head (multi-token words: the sum over their tokens, teacher-forced; the
  hf_text encoder's `label_scores`), and the loss is cross-entropy over them: the label set's softmax of those
  scores. InstructERC (arXiv 2309.11911), BiosERC (arXiv 2407.04279) and PRC-Emo (arXiv 2511.07061) train
  the LLM to generate the label word with the LM loss; CE over the label words' scores is that loss restricted
  to the label set (no probability spent on words that are no label), and needs no new weights: the adapter is
  all a checkpoint holds, and the un-tuned model is already a (zero-shot) classifier at step 0.
- `linear`: a linear layer on the pooled token (`last`, the answer position; or `mean`), trained with the
  adapter and saved beside it (classifier.safetensors), as the encoder teachers' heads are.
The pooled feature (the store's `pooled`) is the final layer's hidden state at that token, in either case.
"""
from __future__ import annotations

import inspect as _inspect

import numpy as np
import torch
from torch import nn

from pipeline import prompts
from pipeline.encoders.text import (HFTextEncoder, decoder_position_ids, is_decoder_only, last_positions,
                                    load_text_model, pool_hidden, pooling_problem, text_inputs, tokenize_pairs)
from pipeline.finetune.lora import adapted
from pipeline.params import ParamsError

DECODER_FORMATS = ("instruction", "utterance", "indi_context")


def decoder_weights(weights: str, revision: str | None) -> bool:
    """Weights of a decoder-only (causal-LM) family, read from their config alone."""
    from transformers import AutoConfig

    from pipeline.runtime import resolve_weights

    return is_decoder_only(AutoConfig.from_pretrained(resolve_weights(weights), revision=revision))


class LLMClassifier(nn.Module):
    """A causal LM -> the pooled final hidden state (-> projection) and the logits: the label words' scores, or
    a linear layer on the pooled vector (module docstring)."""

    def __init__(self, lm, n_labels: int, pooling: str, dropout: float, label_ids: list[list[int]] | None,
                 d_out: int | None = None):
        super().__init__()
        self.encoder = lm   # the (peft-wrapped) causal LM: the checkpoint saves `encoder` (an adapter, with LoRA)
        d = int(lm.config.hidden_size)
        self.projection = nn.Linear(d, d_out) if d_out and d_out != d else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_out or d, n_labels) if label_ids is None else None
        self.pooling, self.label_ids, self._dim = pooling, label_ids, d_out or d
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self._keeps = "logits_to_keep" in _inspect.signature(base.forward).parameters

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def model(self):
        """The LM (what `HFTextEncoder.label_scores` calls for a multi-token word's later tokens)."""
        return self.encoder

    def keep_logits(self, n: int) -> dict:
        return {"logits_to_keep": n} if self._keeps else {}

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        att = batch["attention_mask"]
        left = bool(att[:, -1].all())   # left padding: every row's answer position is the last
        out = self.encoder(input_ids=batch["input_ids"], attention_mask=att, position_ids=decoder_position_ids(att),
                           use_cache=False, output_hidden_states=True, **self.keep_logits(1 if left else 0))
        # hidden_states[-1]: the final norm's output (the base model's last_hidden_state)
        pooled = pool_hidden(out.hidden_states[-1], batch, self.pooling, None).float()
        if self.projection is not None:
            pooled = self.projection(pooled)
        if self.label_ids is None:
            return pooled, self.classifier(self.dropout(pooled))
        z = out.logits[:, -1] if left else out.logits[torch.arange(len(att), device=att.device), last_positions(att)]
        return pooled, HFTextEncoder.label_scores(self, batch, z)   # the encoder's scoring, on this LM


def instruction_inputs(tokenizer, manifest, p, labels: list[str], where: str
                       ) -> tuple[list[dict], list[list[int]]]:
    """Every manifest row's instruction prompt as token ids (never truncated: the answer position is its end) and
    the label words' answer tokens (pipeline/prompts.py), as the hf_text encoder builds them."""
    try:
        words = prompts.label_words(labels, p.label_words)
    except ValueError as e:
        raise ParamsError(f"{where}.{e}") from None
    prompt = prompts.InstructionPrompt(tokenizer, p.instruction, words, p.max_length)
    texts = [str(t) for t in manifest.rows["text"]]
    names = [str(s) for s in manifest.rows["speaker"]]
    inputs = []
    for i, (idx, j) in sorted(prompts.dialogue_turns(manifest).items()):
        first = 0 if p.context_window is None else max(0, j - p.context_window)
        text, _, _ = prompt.build([(names[t], texts[t]) for t in idx[first:j]], names[i], texts[i])
        inputs.append(text)
    encoded = [dict(tokenizer(t, add_special_tokens=prompt.add_special_tokens)) for t in inputs]
    try:
        label_ids = prompt.label_token_ids(inputs[0], words, f"{where}.instruction")
    except ValueError as e:
        raise ParamsError(str(e)) from None
    return encoded, label_ids


def setup_decoder(tuner, where: str = "finetune") -> None:
    """`TextFinetuner.setup` for a decoder-only LLM: tokenizer, LM (bf16 on CUDA under LoRA with bf16 autocast;
    through bitsandbytes with `lora.quantize`), the adapters, the model and every row's tokens."""
    p = tuner.p
    if p.input_format not in DECODER_FORMATS:
        raise ParamsError(f"{where}.input_format: {p.input_format!r} on a decoder-only model ({p.weights}); use one "
                          f"of {DECODER_FORMATS}")
    if problem := pooling_problem(p.pooling, p.input_format, decoder=True):
        raise ParamsError(f"{where}.pooling: {problem}")
    if p.pooling not in ("last", "mean"):
        raise ParamsError(f"{where}.pooling: a decoder-only model is pooled at its last token ('last') or over its "
                          f"tokens ('mean'), not {p.pooling!r}")
    quantize = p.lora.quantize if p.lora is not None else "none"
    # a frozen base may be held in bfloat16 on CUDA (the adapters stay float32: peft's autocast_adapter_dtype);
    # a full fine-tune keeps float32 weights under autocast
    bf16 = tuner.device.type == "cuda" and p.autocast == "bf16" and p.lora is not None
    tuner.tokenizer, lm = load_text_model(p.weights, p.revision, p.input_format, p.speaker_tokens,
                                          device=str(tuner.device), quantize=quantize, autocast=p.autocast,
                                          weights_dtype="bf16" if bf16 else "float32")
    tuner.tokenizer.padding_side = "left"
    tuner.gradient_checkpointing(lm)
    lm = adapted(tuner, lm, where, quantized=True)
    if p.scores_label_words and p.input_format != "instruction":
        raise ParamsError(f"{where}.classifier: label_words needs input_format instruction")
    if p.input_format == "instruction":
        tuner.encoded, label_ids = instruction_inputs(tuner.tokenizer, tuner.manifest, p, tuner.labels, where)
    else:
        label_ids = None
        pairs = text_inputs(tuner.manifest, np.arange(len(tuner.manifest)), p.input_format, p.context_window,
                            p.speaker_tokens, sep=tuner.tokenizer.eos_token or "</s>")
        tuner.encoded = tokenize_pairs(tuner.tokenizer, pairs, p.input_format, p.max_length)
    torch.manual_seed(p.seed)
    tuner.model = LLMClassifier(lm, len(tuner.labels), p.pooling, p.dropout,
                                label_ids if p.scores_label_words else None, tuner.d_out())
    if quantize == "none":
        tuner.model.to(tuner.device)
    else:   # a bitsandbytes model is placed by its loader (device_map); the new layers follow it
        for part in (tuner.model.projection, tuner.model.classifier):
            if part is not None:
                part.to(tuner.device)
    tuner.lengths = np.array([len(e["input_ids"]) for e in tuner.encoded], np.int64)
