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
Pooling: `cls` (first token), `mean` (over real tokens), `mask` (the `<mask>` token; `prompt` only),
`target_mean` (`indi_context` and `prompt`: the mean of the target utterance's own tokens — the utterance
being classified, without its context, special or speaker tokens — while every token attends over the whole
input, so a frozen encoder gives a context-aware feature of that utterance instead of one diluted by the
mean over its context; `tokenize` marks those tokens as `target_mask`).

Layers (`layers`, pipeline/encoders/layers.py): each kept hidden state is pooled the same way; several give
`pooled` [n, L, D] (and `seq` [T, L, D] per row).
"""
from __future__ import annotations


import numpy as np
import pandas as pd
import torch

from pipeline.configs import HFTextConfig
from pipeline.encoders import HFEncoder, register
from pipeline.encoders.layers import HiddenLayers
from pipeline.manifest import Manifest
from pipeline.params import ParamsError
from pipeline.problems import masked_problem
from pipeline.runtime import autocast_context, batched_with_oom_retry, resolve_weights

FORMATS = ("utterance", "indi_context", "prompt")
POOLINGS = ("cls", "mean", "mask", "target_mean")


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
        att = att.to(hidden.dtype)
        return (hidden * att[..., None]).sum(1) / att.sum(1, keepdim=True).clamp(min=1)
    pos = (batch["input_ids"] == mask_token_id).float().argmax(1)
    return hidden[torch.arange(len(pos), device=hidden.device), pos]


def load_text_model(weights: str, revision: str | None, fmt: str, n_speakers: int):
    """Tokenizer and encoder from a hub id or local directory; speaker tokens added for `prompt`."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_weights(weights)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    model = AutoModel.from_pretrained(path, revision=revision)
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


def pooling_problem(pooling: str, fmt: str) -> str | None:
    """Why `pooling` does not go with input format `fmt`, or None."""
    if pooling not in POOLINGS:
        return f"{pooling!r} is not one of {POOLINGS}"
    if pooling == "mask" and fmt != "prompt":
        return f"pooling 'mask' (at the prompt's <mask> token) needs input_format 'prompt' (not {fmt!r})"
    if pooling == "target_mean" and fmt not in ("indi_context", "prompt"):
        return (f"pooling 'target_mean' (the target utterance's tokens inside its context) needs input_format "
                f"'indi_context' or 'prompt' (not {fmt!r}; for 'utterance' it is 'mean')")
    if fmt == "prompt" and pooling not in ("mask", "target_mean"):
        return (f"input_format 'prompt' is pooled at its <mask> token or over its target: 'mask' or "
                f"'target_mean' (not {pooling!r})")
    return None


@register
class HFTextEncoder(HiddenLayers, HFEncoder):
    kind = "hf_text"
    modality = "text"
    needs_media = False
    Config = HFTextConfig

    def __init__(self, name, config: HFTextConfig):
        super().__init__(name, config)
        if problem := pooling_problem(config.pooling, config.input_format):
            raise ParamsError(f"encoders.{name}.pooling: {problem}")
        self.tokenizer, model = load_text_model(config.weights, config.revision, config.input_format,
                                                config.speaker_tokens)
        self.place(model)
        self.hidden_layers = self.kept_layers()

    def tokenize(self, pairs: list[tuple[str, str | None]], targets: list[str] | None = None) -> list[dict]:
        """Token ids of `pairs`; with `target_mean` pooling also each row's `target_mask` (`targets`: the target
        utterances' texts)."""
        if self.config.pooling != "target_mean":
            targets = None
        elif targets is None:
            raise ValueError("target_mean pooling: tokenize needs the target utterances' texts")
        return tokenize_pairs(self.tokenizer, pairs, self.config.input_format, self.config.max_length, targets)

    def encode(self, rows: pd.DataFrame, manifest: Manifest, media=None):
        c = self.config
        if getattr(self, "_inputs_of", None) is not manifest:
            # the context formats need whole dialogues: build every row's input once, not once per chunk
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
        encoded = self.tokenize(pairs, [str(t) for t in rows["text"]])
        targets = [e.pop("target_mask", None) for e in encoded]
        pooled = np.zeros((len(rows), *self.pooled_shape), np.float32)
        seqs: list[np.ndarray] = [np.zeros((0, *self.pooled_shape), np.float32)] * len(rows)

        def run(batch_rows):
            batch = self.tokenizer.pad([encoded[i] for i in batch_rows], return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            target = None
            if c.pooling == "target_mean":
                target = pad_flags([targets[i] for i in batch_rows], batch["input_ids"].shape[1],
                                   self.tokenizer.padding_side).to(self.device)
            with autocast_context(self.device, c.autocast):
                states = self.kept_states(self.model(**batch, **self.model_kwargs()))
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
