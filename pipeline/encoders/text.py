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
Pooling: `cls` (first token), `mean` (over real tokens), `mask` (the `<mask>` token; `prompt` only).
"""
from __future__ import annotations


import numpy as np
import pandas as pd
import torch

from pipeline.configs import HFTextConfig
from pipeline.encoders import HFEncoder, register
from pipeline.manifest import Manifest
from pipeline.params import ParamsError
from pipeline.problems import masked_problem
from pipeline.runtime import autocast_context, batched_with_oom_retry, resolve_weights

FORMATS = ("utterance", "indi_context", "prompt")
POOLINGS = ("cls", "mean", "mask")




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


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str | None]], fmt: str, max_length: int) -> list[dict]:
    """Token ids of (text, text_pair) inputs, at most `max_length` long.

    `prompt` and `utterance` are one sequence (the tokenizer's truncation side is set to left for `prompt` by
    `load_text_model`, so the oldest history goes first). `indi_context` is `[CLS] utt [SEP] context [SEP]`:
    the utterance keeps its start and always comes first; the context gets the room the utterance leaves and
    loses its oldest tokens first; an utterance that fills the room alone is encoded without context."""
    if fmt != "indi_context":
        return [tokenizer(text, truncation=True, max_length=max_length) for text, _ in pairs]
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
        out.append({k: v for k, v in row.items() if k in tokenizer.model_input_names})
    return out


def pool_hidden(hidden: torch.Tensor, batch: dict, pooling: str, mask_token_id: int | None) -> torch.Tensor:
    """[B, T, d] -> [B, d] at the pooling position: first token, mean of real tokens, or the <mask> token."""
    att = batch["attention_mask"]
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
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


@register
class HFTextEncoder(HFEncoder):
    kind = "hf_text"
    modality = "text"
    needs_media = False
    Config = HFTextConfig

    def __init__(self, name, config: HFTextConfig):
        super().__init__(name, config)
        if config.pooling not in POOLINGS or (config.pooling == "mask") != (config.input_format == "prompt"):
            raise ParamsError(f"encoders.{name}: pooling 'mask' goes with input_format 'prompt' (and only it)")
        self.tokenizer, model = load_text_model(config.weights, config.revision, config.input_format,
                                                config.speaker_tokens)
        self.place(model)

    def tokenize(self, pairs: list[tuple[str, str | None]]) -> list[dict]:
        return tokenize_pairs(self.tokenizer, pairs, self.config.input_format, self.config.max_length)

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
        encoded = self.tokenize(pairs)
        pooled = np.zeros((len(rows), self.dim), np.float32)
        seqs: list[np.ndarray] = [np.zeros((0, self.dim), np.float32)] * len(rows)

        def run(batch_rows):
            batch = self.tokenizer.pad([encoded[i] for i in batch_rows], return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with autocast_context(self.device, c.autocast):
                hidden = self.model(**batch).last_hidden_state.float()
            att = batch["attention_mask"]
            pooled[batch_rows] = pool_hidden(hidden, batch, c.pooling, self.tokenizer.mask_token_id).cpu().numpy()
            if c.return_sequence:
                for k, i in enumerate(batch_rows):
                    seqs[i] = hidden[k, att[k].bool()].cpu().numpy()

        order = np.argsort([len(e["input_ids"]) for e in encoded], kind="stable")  # length-sorted batches
        with torch.inference_mode():
            batched_with_oom_retry(order, c.batch_size, run)
        pooled[~valid] = 0.0
        arrays = {"pooled": pooled, "valid": valid}
        if c.return_sequence:
            from pipeline.store import ragged
            arrays.update(ragged(seqs, "seq", np.float32, (self.dim,)))
        return arrays, problems
