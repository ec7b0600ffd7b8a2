"""Text encoders: any Hugging Face encoder, loaded with `from_pretrained(hub id or local dir)`.

Input formats (the utterance at dialogue position j, 0-based; K = `context_window`):
- `utterance`: the utterance alone.
- `indi_context` (DialogueTRM eq. 1): `[CLS] utt [SEP] indi-context [SEP]` — the indi-context is the same
  speaker's utterances at positions [max(0, j-K), j), oldest first; segment ids tell the two parts apart;
  the context is truncated from its oldest end.
- `prompt` (TelME eq. 1-3): `C_k </s> P_k` with C_k = `<s_a> t_1 <s_b> t_2 ... <s_a> t_k` (the dialogue up
  to the utterance, or its last K turns when K is set) and P_k = `Now <s_a> feels <mask>`; speaker tokens
  `<s1>..<sN>` are numbered per dialogue in order of appearance and added to the tokenizer; the history
  is truncated from its oldest end so the prompt is always kept.
- `instruction` (decoder-only LLMs; pipeline/prompts.py): a template with the speaker-tagged history within
  `max_length` tokens (oldest turns dropped first, the target utterance always whole), the label words and a
  question ending at the answer position; the tokenizer's chat template applied when it has one. The store then
  also holds `logits` [N, C]: each label word's log-probability as the answer (`label_scores`), which makes an
  un-tuned LLM a zero-shot classifier and a teacher whose logits TelME's students distil.
Pooling: `cls` (first token), `mean` (over real tokens), `mask` (the `<mask>` token; `prompt` only), `last`
(the last non-padding token, under left or right padding: a decoder-only model's summary of its input),
`target_mean` (`indi_context`, `prompt` and `instruction`: the mean of the target utterance's own tokens — the utterance
being classified, without its context, special or speaker tokens — while every token attends over the whole
input, so a frozen encoder gives a context-aware feature of that utterance instead of one diluted by the
mean over its context; `tokenize` marks those tokens as `target_mask`).

Layers (`layers`, pipeline/encoders/layers.py): each kept hidden state is pooled the same way; several give
`pooled` [n, L, D] (and `seq` [T, L, D] per row).

Decoder-only models (the causal-LM families transformers loads: Llama, Qwen2/3, Mistral, Gemma, GPT-2, ...;
`is_decoder_only`) are loaded with their LM head, padded on the left with position ids counted over the real
tokens (so padding moves nothing), with the EOS token as the padding token when the tokenizer has none. On
CUDA, `weights_dtype: bf16` loads the weights in bfloat16, and `quantize: nf4 | int8_bnb` loads them through
bitsandbytes (refused elsewhere, by `ercflow check` too). `trust_remote_code` stays off: only architectures
transformers itself implements are loaded.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from pipeline import prompts
from pipeline.configs import HFTextConfig
from pipeline.encoders.base import HFEncoder, register
from pipeline.encoders.layers import HiddenLayers
from pipeline.manifest import Manifest
from pipeline.params import ParamsError
from pipeline.problems import Problem, masked_problem
from pipeline.runtime import (autocast_context, batched_with_oom_retry, compute_precision, resolve_device,
                              resolve_weights, safetensors_only)
from pipeline.store import fingerprint

FORMATS = ("utterance", "indi_context", "prompt", "instruction")
POOLINGS = ("cls", "mean", "mask", "target_mean", "last")
# options added after stores were written: left out of the provenance at these defaults (same fingerprints)
NEUTRAL = {"weights_dtype": "float32", "instruction": None, "label_words": None}

log = logging.getLogger(__name__)


def speaker_token(k: int, n_max: int) -> str:
    return f"<s{min(k, n_max - 1) + 1}>"


def text_inputs(manifest: Manifest, rows: np.ndarray, fmt: str, window: int | None, n_speakers: int,
                sep: str = "</s>", mask: str = "<mask>") -> list[tuple[str, str | None]]:
    """(text, text_pair) per row in `rows` (manifest row indices) for input format `fmt`."""
    if fmt not in FORMATS:
        raise ParamsError(f"input_format must be one of {FORMATS}, not {fmt!r}")
    if fmt == "utterance":
        return [(manifest.rows.at[int(i), "text"], None) for i in rows]
    texts = manifest.rows["text"].tolist()
    speakers = manifest.speaker_index()
    position = {}
    for idx in manifest.dialogues():
        for j, i in enumerate(idx):
            position[int(i)] = (idx, j)
    out = []
    for i in rows:
        idx, j = position[int(i)]
        if fmt == "indi_context":
            k = 5 if window is None else window
            ctx = [texts[t] for t in idx[max(0, j - k):j] if speakers[t] == speakers[i]]
            out.append((texts[i], " ".join(ctx)))
        else:
            first = 0 if window is None else max(0, j - window)
            history = " ".join(f"{speaker_token(speakers[t], n_speakers)} {texts[t]}" for t in idx[first:j + 1])
            out.append((f"{history} {sep} Now {speaker_token(speakers[i], n_speakers)} feels {mask}", None))
    return out


def prompt_target_span(prompt: str, target: str, sep: str) -> tuple[int, int]:
    """Character span of the target utterance in a `prompt` input: the end of its history, just before
    ` <sep> Now <s_k> feels <mask>` (`text_inputs`)."""
    end = prompt.rfind(f" {sep} Now ")
    start = end - len(target)
    if end < 0 or start < 0 or prompt[start:end] != target:
        raise ValueError(f"not a prompt input of the utterance {target!r}: {prompt[:80]!r}...")
    return start, end


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str | None]], fmt: str, max_length: int,
                   targets: list[str] | None = None) -> list[dict]:
    """Token ids of (text, text_pair) inputs, at most `max_length` long.

    `prompt` and `utterance` are one sequence (the tokenizer's truncation side is set to left for `prompt` by
    `load_text_model`, so the oldest history goes first). `indi_context` is `[CLS] utt [SEP] context [SEP]`:
    the utterance keeps its start and always comes first; the context gets the room the utterance leaves and
    loses its oldest tokens first; an utterance that fills the room alone is encoded without context.

    With `targets` (the target utterances' texts, one per pair), each row also has `target_mask`: 1 at the
    tokens of its target utterance (for `target_mean` pooling; not a model input). `indi_context`: the first
    sequence's tokens; `prompt`: the tokens whose characters fall in the target's span at the end of the
    history; `utterance`: every token but the special ones."""
    if fmt != "indi_context":
        if targets is None:
            return [tokenizer(text, truncation=True, max_length=max_length) for text, _ in pairs]
        out = []
        for (text, _), target in zip(pairs, targets):
            row = dict(tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True,
                                 return_special_tokens_mask=True))
            offsets, special = row.pop("offset_mapping"), row.pop("special_tokens_mask")
            sep = tokenizer.sep_token or "</s>"
            lo, hi = prompt_target_span(text, target, sep) if fmt == "prompt" else (0, len(text))
            row["target_mask"] = [int(not sp and e > s and s < hi and e > lo) for (s, e), sp in zip(offsets, special)]
            out.append(row)
        return out
    from tokenizers import Tokenizer

    # a private copy of the fast tokenizer's engine: free of the truncation state the wrapper leaves on it
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    room_pair = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    room_single = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    out = []
    for text, context in pairs:
        utt = backend.encode(text, add_special_tokens=False)
        ctx = backend.encode(context, add_special_tokens=False) if context else None
        if ctx is None or not ctx.ids or len(utt.ids) >= room_pair:
            ctx = None
            utt.truncate(room_single, direction="right")
        else:
            ctx.truncate(room_pair - len(utt.ids), direction="left")
        enc = backend.post_process(utt, ctx, add_special_tokens=True)
        row = {"input_ids": enc.ids, "token_type_ids": enc.type_ids, "attention_mask": enc.attention_mask}
        row = {k: v for k, v in row.items() if k in tokenizer.model_input_names}
        if targets is not None:   # the utterance is the first sequence: its tokens are the first non-special ones
            plain = np.cumsum([1 - sp for sp in enc.special_tokens_mask])
            row["target_mask"] = [int(not sp and k <= len(utt.ids)) for sp, k in zip(enc.special_tokens_mask, plain)]
        out.append(row)
    return out


def cut_utterances(tokenizer, rows: pd.DataFrame, max_length: int) -> list[dict]:
    """A `trimmed` problem for each row whose utterance alone is longer than `max_length` allows (its tokens
    beyond it are cut; a context format's context is cut by design and not listed)."""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    lengths = [len(ids) for ids in tokenizer([str(t) for t in rows["text"]], add_special_tokens=False,
                                             truncation=False, verbose=False)["input_ids"]]
    return [Problem(r["utt_id"], "manifest.csv", f"text cut to max_length ({n} tokens, room for {room})", "text",
                    "trimmed").as_dict() for (_, r), n in zip(rows.iterrows(), lengths) if n > room]


def pool_hidden(hidden: torch.Tensor, batch: dict, pooling: str, mask_token_id: int | None,
                target: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, d] -> [B, d] at the pooling position: first token, mean of real tokens, mean of the target
    tokens (`target` [B, T], 1 at the target utterance's tokens), or the <mask> token."""
    att = batch["attention_mask"]
    if pooling == "cls":
        return hidden[:, 0]
    if pooling in ("mean", "target_mean"):
        if pooling == "target_mean":
            att = target * att
        # masked_fill, not a product: a padded position may hold a non-finite state (a fully masked query)
        summed = hidden.masked_fill(~att.bool()[..., None], 0.0).sum(1)
        return summed / att.to(hidden.dtype).sum(1, keepdim=True).clamp(min=1)
    if pooling == "last":
        return hidden[torch.arange(len(att), device=hidden.device), last_positions(att)]
    pos = (batch["input_ids"] == mask_token_id).float().argmax(1)
    return hidden[torch.arange(len(pos), device=hidden.device), pos]


def last_positions(att: torch.Tensor) -> torch.Tensor:
    """[B, T] attention mask -> [B] index of each row's last real token (left or right padding)."""
    return att.shape[1] - 1 - att.flip(1).argmax(1)


def decoder_position_ids(att: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the real tokens ([B, T]): a left-padded row's first token is at 0, as alone."""
    return (att.long().cumsum(1) - 1).clamp(min=0)


def is_decoder_only(model_config) -> bool:
    """A causal-LM family only (Llama, Qwen2/3, Mistral, Gemma, GPT-2, ...): not an encoder that transformers
    can also run as a causal LM (BERT, RoBERTa: they have a masked-LM head), not an encoder-decoder."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(model_config, "model_type", None)
    return (kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(model_config, "is_encoder_decoder", False))


def load_text_model(weights: str, revision: str | None, fmt: str, n_speakers: int, *, device: str = "cpu",
                    quantize: str = "none", autocast: str = "bf16", weights_dtype: str = "float32"):
    """Tokenizer and model from a hub id or local directory; speaker tokens added for `prompt`. A decoder-only
    model comes with its LM head (label scoring), padded on the left, EOS as padding when it has no pad token;
    on CUDA in bfloat16 (`weights_dtype: bf16`) or quantised by bitsandbytes (`quantize: nf4 | int8_bnb`)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from pipeline.runtime import BNB_QUANTIZE, bitsandbytes_config

    path = resolve_weights(weights)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    decoder = is_decoder_only(AutoConfig.from_pretrained(path, revision=revision))
    extra = {}
    on_cuda = str(device).startswith("cuda")
    if on_cuda and weights_dtype == "bf16":
        extra["dtype"] = torch.bfloat16
    if quantize in BNB_QUANTIZE:   # compute_precision has refused it off CUDA
        extra.update(quantization_config=bitsandbytes_config(quantize, autocast), device_map={"": str(device)})
        extra.setdefault("dtype", torch.bfloat16 if autocast == "bf16" else torch.float16)
    loader = AutoModelForCausalLM if decoder else AutoModel
    model = loader.from_pretrained(path, revision=revision, **extra, **safetensors_only(path))
    if decoder:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ParamsError(f"{weights}: the tokenizer has neither a padding nor an EOS token to pad with")
            log.info(f"{weights}: the tokenizer has no padding token: padding with its EOS token "
                     f"{tokenizer.eos_token!r} (masked out: it changes no feature)")
            tokenizer.pad_token = tokenizer.eos_token
    if fmt == "prompt":
        if tokenizer.mask_token is None:
            raise ParamsError(f"{weights}: the prompt format needs a tokenizer with a mask token")
        tokens = [f"<s{k}>" for k in range(1, n_speakers + 1)]
        if tokenizer.add_special_tokens({"additional_special_tokens": tokens}):
            # the new rows are drawn at random around the old embeddings' mean: a fixed draw keeps frozen
            # prompt features (and a fine-tune's start) the same on every run, without touching the global RNG
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model.resize_token_embeddings(len(tokenizer))
    if fmt in ("prompt", "indi_context"):
        tokenizer.truncation_side = "left"   # drop the oldest history / context, keep the prompt / utterance
    return tokenizer, model


def pooling_problem(pooling: str, fmt: str, decoder: bool = False) -> str | None:
    """Why `pooling` does not go with input format `fmt` (on a decoder-only model when `decoder`), or None."""
    if pooling not in POOLINGS:
        return f"{pooling!r} is not one of {POOLINGS}"
    if decoder and pooling == "cls":
        return ("pooling 'cls' on a decoder-only model is its first token, which attends to nothing after it: "
                "use 'last' (or 'mean')")
    if fmt == "instruction":
        return prompts.instruction_problem(fmt, pooling, None, None)
    if pooling == "mask" and fmt != "prompt":
        return f"pooling 'mask' (at the prompt's <mask> token) needs input_format 'prompt' (not {fmt!r})"
    if pooling == "target_mean" and fmt not in ("indi_context", "prompt", "instruction"):
        return (f"pooling 'target_mean' (the target utterance's tokens inside its context) needs input_format "
                f"'indi_context', 'prompt' or 'instruction' (not {fmt!r}; for 'utterance' it is 'mean')")
    if fmt == "prompt" and pooling not in ("mask", "target_mean"):
        return (f"input_format 'prompt' is pooled at its <mask> token or over its target: 'mask' or "
                f"'target_mean' (not {pooling!r})")
    return None


@register
class HFTextEncoder(HiddenLayers, HFEncoder):
    needs_media = False
    Config = HFTextConfig

    def __init__(self, name, config: HFTextConfig):
        super().__init__(name, config)
        where = f"encoders.{name}"
        if problem := pooling_problem(config.pooling, config.input_format):
            raise ParamsError(f"{where}.pooling: {problem}")
        # refused before the weights load (compute_precision, again in place())
        compute_precision(resolve_device(config.device), config.autocast, config.quantize, where)
        self.tokenizer, model = load_text_model(
            config.weights, config.revision, config.input_format, config.speaker_tokens,
            device=str(resolve_device(config.device)), quantize=config.quantize, autocast=config.autocast,
            weights_dtype=config.weights_dtype)
        self.decoder = is_decoder_only(model.config)
        if self.decoder and (problem := pooling_problem(config.pooling, config.input_format, decoder=True)):
            raise ParamsError(f"{where}.pooling: {problem}")
        if config.input_format == "instruction" and not self.decoder:
            raise ParamsError(f"{where}.input_format: 'instruction' scores label words with a decoder-only LLM's "
                              f"LM head; {config.weights} is a {model.config.model_type} encoder")
        self.place(model)
        self.hidden_layers = self.kept_layers()
        self.scores_labels = config.input_format == "instruction"

    def provenance(self):
        """As before the decoder-only options existed at their defaults (NEUTRAL): the same fingerprints."""
        prov = super().provenance()
        config = {k: v for k, v in prov["config"].items() if not (k in NEUTRAL and v == NEUTRAL[k])}
        return {**prov, "config": config, "config_hash": fingerprint(config)}

    def manifest_provenance(self, manifest: Manifest) -> dict:
        """With label scoring, the labels the store's `logits` columns are (in order) and the words scored."""
        if self.config.input_format != "instruction":
            return {}
        labels = list(manifest.meta.labels)
        return {"labels": labels, "label_words": self.words(labels)}

    def words(self, labels: list[str]) -> list[str]:
        try:
            return prompts.label_words(labels, self.config.label_words)
        except ValueError as e:
            raise ParamsError(f"encoders.{self.name}.{e}") from None

    def tokenize(self, pairs: list[tuple[str, str | None]], targets: list[str] | None = None) -> list[dict]:
        """Token ids of `pairs`; with `target_mean` pooling also each row's `target_mask` (`targets`: the target
        utterances' texts)."""
        if self.config.pooling != "target_mean":
            targets = None
        elif targets is None:
            raise ValueError("target_mean pooling: tokenize needs the target utterances' texts")
        return tokenize_pairs(self.tokenizer, pairs, self.config.input_format, self.config.max_length, targets)

    def instruction_inputs(self, manifest: Manifest) -> None:
        """Every row's instruction prompt (pipeline/prompts.py), its target span, and the label words' tokens."""
        c = self.config
        words = self.words(list(manifest.meta.labels))
        self.prompt = prompts.InstructionPrompt(self.tokenizer, c.instruction, words, c.max_length)
        texts = [str(t) for t in manifest.rows["text"]]
        names = [str(s) for s in manifest.rows["speaker"]]
        self._inputs, self._spans = [], []
        for i, (idx, j) in sorted(prompts.dialogue_turns(manifest).items()):
            first = 0 if c.context_window is None else max(0, j - c.context_window)
            history = [(names[t], texts[t]) for t in idx[first:j]]
            text, span, _ = self.prompt.build(history, names[i], texts[i])
            self._inputs.append((text, None))
            self._spans.append(span)
        self.label_ids = self.prompt.label_token_ids(self._inputs[0][0], words, f"encoders.{self.name}.instruction")

    def instruction_tokens(self, rows: np.ndarray) -> list[dict]:
        """Token ids of the prompts of manifest rows `rows`, never truncated (the answer position is their end);
        with `target_mean` each row's `target_mask` from its target span."""
        out = []
        for i in rows:
            text, (lo, hi) = self._inputs[i][0], self._spans[i]
            want_target = self.config.pooling == "target_mean"
            row = dict(self.tokenizer(text, add_special_tokens=self.prompt.add_special_tokens,
                                      return_offsets_mapping=want_target))
            if want_target:
                row["target_mask"] = [int(e > s and s < hi and e > lo) for s, e in row.pop("offset_mapping")]
            out.append(row)
        return out

    def label_scores(self, batch: dict, answer_logits: torch.Tensor) -> torch.Tensor:
        """[B, C] summed log-probabilities of each label word's tokens as the answer, teacher-forced: the
        first token's from the prompt's pass (`answer_logits` [B, V], at the answer position), each later
        one's from a pass over the prompt followed by the word's earlier tokens."""
        logp = torch.log_softmax(answer_logits.float(), -1)
        scores = torch.stack([logp[:, ids[0]] for ids in self.label_ids], 1)
        B, att = len(logp), batch["attention_mask"]
        for c, ids in enumerate(self.label_ids):
            if len(ids) == 1:
                continue
            m = len(ids) - 1
            given = torch.tensor(ids[:-1], device=att.device).expand(B, m)
            ext_att = torch.cat([att, torch.ones_like(given)], 1)
            out = self.model(input_ids=torch.cat([batch["input_ids"], given], 1), attention_mask=ext_att,
                             position_ids=decoder_position_ids(ext_att), use_cache=False, **self.keep_logits(m))
            lp = torch.log_softmax(out.logits[:, -m:].float(), -1)   # position k predicts ids[k + 1]
            nxt = torch.tensor(ids[1:], device=att.device).expand(B, m)
            scores[:, c] += lp.gather(2, nxt[..., None])[..., 0].sum(1)
        return scores

    def keep_logits(self, n: int) -> dict:
        """`logits_to_keep=n` where the model takes it (the LM head over the last n positions only)."""
        import inspect

        if not hasattr(self, "_keeps"):
            self._keeps = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        return {"logits_to_keep": n} if self._keeps else {}

    def forward_states(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The kept hidden states [B, T, D] (float32) and, when labels are scored, the logits at each row's
        answer position (its last real token) [B, V]."""
        if not self.decoder:
            return self.kept_states(self.model(**batch, **self.model_kwargs())), None
        att = batch["attention_mask"]
        args = {**batch, "position_ids": decoder_position_ids(att), "use_cache": False}
        if not self.scores_labels:   # the base model: no LM head over the vocabulary
            return self.kept_states(self.model.base_model(**args, **self.model_kwargs())), None
        left = bool(att[:, -1].all())   # every row ends at the last position
        out = self.model(**args, output_hidden_states=True, **self.keep_logits(1 if left else att.shape[1]))
        # hidden_states[-1] is the final norm's output, i.e. the base model's last_hidden_state
        hs = out.hidden_states
        states = [hs[-1].float()] if self.hidden_layers is None else [hs[i].float() for i in self.hidden_layers]
        z = out.logits[:, -1] if left else out.logits[torch.arange(len(att), device=att.device), last_positions(att)]
        return states, z

    def encode(self, rows: pd.DataFrame, manifest: Manifest, media=None):
        c = self.config
        if getattr(self, "_inputs_of", None) is not manifest:
            # the context formats need whole dialogues: build every row's input once, not once per chunk
            if c.input_format == "instruction":
                self.instruction_inputs(manifest)
            else:
                self._inputs = text_inputs(manifest, np.arange(len(manifest)), c.input_format, c.context_window,
                                           c.speaker_tokens, sep=self.tokenizer.sep_token or "</s>",
                                           mask=self.tokenizer.mask_token or "<mask>")
            self._inputs_of = manifest
        pairs = [self._inputs[i] for i in rows.index]
        valid = np.array([bool(str(t).strip()) for t in rows["text"]])
        problems = []
        for (_, r), ok in zip(rows.iterrows(), valid):
            if not ok:
                if c.on_empty == "fail":
                    raise ValueError(f"{r['utt_id']}: empty text (set on_empty: mask to mask it)")
                problems.append(masked_problem(r, "manifest.csv", "empty text", "text"))
        if c.input_format == "instruction":   # the target is never cut (its history is)
            encoded = self.instruction_tokens(rows.index.to_numpy())
        else:
            problems += cut_utterances(self.tokenizer, rows, c.max_length)
            encoded = self.tokenize(pairs, [str(t) for t in rows["text"]])
        targets = [e.pop("target_mask", None) for e in encoded]
        pooled = np.zeros((len(rows), *self.pooled_shape), np.float32)
        logits = np.zeros((len(rows), len(manifest.meta.labels)), np.float32) if self.scores_labels else None
        seqs: list[np.ndarray] = [np.zeros((0, *self.pooled_shape), np.float32)] * len(rows)

        def run(batch_rows):
            batch = self.tokenizer.pad([encoded[i] for i in batch_rows], return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            target = None
            if c.pooling == "target_mean":
                target = pad_flags([targets[i] for i in batch_rows], batch["input_ids"].shape[1],
                                   self.tokenizer.padding_side).to(self.device)
            with autocast_context(self.device, c.autocast):
                states, answer = self.forward_states(batch)
                if logits is not None:
                    logits[batch_rows] = self.label_scores(batch, answer).cpu().numpy()
            att = batch["attention_mask"]
            pooled[batch_rows] = self.stack([pool_hidden(h, batch, c.pooling, self.tokenizer.mask_token_id, target)
                                             for h in states]).cpu().numpy()
            if c.return_sequence:
                for k, i in enumerate(batch_rows):
                    seqs[i] = self.stack([h[k, att[k].bool()] for h in states]).cpu().numpy()

        order = np.argsort([len(e["input_ids"]) for e in encoded], kind="stable")  # length-sorted batches
        with torch.inference_mode():
            batched_with_oom_retry(order, c.batch_size, run)
        pooled[~valid] = 0.0
        arrays = {"pooled": pooled, "valid": valid}
        if logits is not None:
            logits[~valid] = 0.0
            arrays["logits"] = logits
        if c.return_sequence:
            from pipeline.store import ragged
            arrays.update(ragged(seqs, "seq", np.float32, self.pooled_shape))
        return arrays, problems


def pad_flags(flags: list[list[int]], length: int, side: str = "right") -> torch.Tensor:
    """Per-row 0/1 token flags padded with 0 to `length` on `side` (as the tokenizer padded the ids): [B, T]."""
    out = torch.zeros(len(flags), length, dtype=torch.long)
    for k, f in enumerate(flags):
        if f:
            if side == "left":
                out[k, length - len(f):] = torch.tensor(f)
            else:
                out[k, :len(f)] = torch.tensor(f)
    return out
