"""The instruction prompt of a decoder-only LLM (`hf_text` with `input_format: instruction`) and its label words.

A leaf module (the tokenizer is passed in; nothing of torch or transformers is imported), so that the params
check can validate a template without loading model code.

One utterance's prompt is the template `instruction` (Python `str.format` fields; a literal brace is `{{`/`}}`)
filled with:
- `{history}`: the dialogue's earlier turns, one `speaker: text` line each, oldest first: the last
  `context_window` turns (all of them when it is None), of which the oldest are dropped one at a time until the
  whole input fits `max_length` tokens. The target utterance is never cut: a target that does not fit on its
  own goes over the budget (without history) rather than lose the words being classified.
- `{speaker}`, `{utterance}`: the target turn's speaker (the manifest's name) and text.
- `{labels}`: the label words, comma-separated, in the dataset's label order.
The template ends with the question, so the next token is the answer (as InstructERC's retrieval-free prompt
does: arXiv:2309.11911). When the tokenizer has a chat template, the filled template is the user's message and
the chat template renders it with the generation prompt: the answer position is the end of the assistant
header. Without one, the filled template is tokenized as it is (with the tokenizer's BOS, if it adds one).

Label words are the dataset's label names, or `label_words[label]` for a verbaliser (`neu: neutral`). A word's
tokens are the ones the tokenizer gives the prompt followed by the word (after a space, unless the prompt ends
with whitespace or is a chat rendering), less the prompt's own: the tokens the model would emit as its answer.
"""
from __future__ import annotations

import string
from typing import Any, Mapping, Sequence

PLACEHOLDERS = ("history", "speaker", "utterance", "labels")
REQUIRED = ("utterance", "labels")   # the target whole, and the label set named
INSTRUCTION_POOLINGS = ("last", "mean", "target_mean")

DEFAULT_INSTRUCTION = (
    "Now you are an expert in sentiment and emotional analysis. The following conversation involves several "
    "speakers.\n"
    "{history}\n"
    "{speaker}: {utterance}\n"
    "Select the emotional label of {speaker}'s last utterance from: {labels}.\n"
    "Answer:")


def template_fields(template: str) -> list[tuple[str, str | None]]:
    """(literal text, field name or None) pieces of `template` (a positional `{}` has the name ''); ValueError
    on a malformed one."""
    return [(lit, name) for lit, name, _, _ in string.Formatter().parse(template)]


def instruction_problem(input_format: str, pooling: str, instruction: str | None,
                        label_words: Mapping[str, str] | None) -> str | None:
    """Why the instruction options of an `hf_text` config do not go together, or None (params check)."""
    if input_format != "instruction":
        for key, value in (("instruction", instruction), ("label_words", label_words)):
            if value is not None:
                return f"{key}: an option of input_format 'instruction' (input_format is {input_format!r})"
        return None
    if pooling not in INSTRUCTION_POOLINGS:
        return (f"pooling: input_format 'instruction' is pooled at its last token ('last', the answer position), "
                f"over every token ('mean') or over the target utterance ('target_mean'), not {pooling!r}")
    template = DEFAULT_INSTRUCTION if instruction is None else instruction
    try:
        pieces = template_fields(template)
    except ValueError as e:
        return f"instruction: not a valid template ({e}; a literal brace is written {{{{ or }}}})"
    names = [n for _, n in pieces if n is not None]
    unknown = sorted({"{" + n + "}" for n in names if n not in PLACEHOLDERS})
    if unknown:
        return (f"instruction: unknown placeholder(s) {unknown} (known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}; "
                "a literal brace is written {{ or }})")
    missing = [p for p in REQUIRED if p not in names]
    if missing:
        return f"instruction: the template must contain {', '.join('{' + p + '}' for p in missing)}"
    tail = template.rstrip()
    if any(tail.endswith("{" + p + "}") for p in PLACEHOLDERS if p != "labels"):
        return ("instruction: the template must end with the question's fixed text (the answer follows it), not "
                "with {history}, {speaker} or {utterance}")
    if label_words is not None and any(not str(w).strip() for w in label_words.values()):
        return "label_words: a label's word is empty"
    return None


def label_words(labels: Sequence[str], verbaliser: Mapping[str, str] | None) -> list[str]:
    """The word scored for each label: its name, or the verbaliser's word. ValueError on a verbaliser key that
    is not a label (a typo would silently score the label's name instead)."""
    verbaliser = dict(verbaliser or {})
    unknown = sorted(set(verbaliser) - set(labels))
    if unknown:
        raise ValueError(f"label_words: {unknown} are not labels of the dataset (labels: {list(labels)})")
    return [str(verbaliser.get(lab, lab)) for lab in labels]


def fill(template: str, history: Sequence[tuple[str, str]], speaker: str, utterance: str, labels: str
         ) -> tuple[str, tuple[int, int]]:
    """The filled template and the character span of its (first) `{utterance}`."""
    values = {"history": "\n".join(f"{s}: {t}" for s, t in history), "speaker": speaker, "utterance": utterance,
              "labels": labels}
    out, span = [], None
    pos = 0
    for lit, name in template_fields(template):
        out.append(lit)
        pos += len(lit)
        if name is not None:
            if name == "utterance" and span is None:
                span = (pos, pos + len(utterance))
            out.append(values[name])
            pos += len(values[name])
    return "".join(out), span


class InstructionPrompt:
    """Builds one utterance's prompt within the token budget (module docstring) for `tokenizer`."""

    def __init__(self, tokenizer, template: str | None, words: Sequence[str], max_length: int):
        self.tokenizer = tokenizer
        self.template = DEFAULT_INSTRUCTION if template is None else template
        self.labels = ", ".join(words)
        self.max_length = max_length
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    @property
    def add_special_tokens(self) -> bool:
        """A chat rendering carries its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS)."""
        return not self.chat

    def render(self, history: Sequence[tuple[str, str]], speaker: str, utterance: str
               ) -> tuple[str, tuple[int, int]]:
        """The model's input text and the target utterance's character span in it."""
        text, (lo, hi) = fill(self.template, history, speaker, utterance, self.labels)
        if not self.chat:
            return text, (lo, hi)
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        at = rendered.find(text)
        if at < 0:
            raise ValueError("the tokenizer's chat template changes the user's message: the target utterance "
                             "cannot be located in its rendering")
        return rendered, (at + lo, at + hi)

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"])

    def build(self, history: Sequence[tuple[str, str]], speaker: str, utterance: str
              ) -> tuple[str, tuple[int, int], int]:
        """(text, target span, number of history turns kept): the most recent turns that fit `max_length`."""
        def at(start: int):
            return self.render(history[start:], speaker, utterance)

        text, span = at(0)
        if self.n_tokens(text) <= self.max_length:
            return text, span, len(history)
        lo, hi = 1, len(history)   # the fewest turns dropped that fit (token counts shrink as turns go)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.n_tokens(at(mid)[0]) <= self.max_length:
                hi = mid
            else:
                lo = mid + 1
        text, span = at(lo)
        return text, span, len(history) - lo

    def answer_prefix(self, prompt: str) -> str:
        return "" if self.chat or prompt[-1:].isspace() else " "

    def label_token_ids(self, prompt: str, words: Sequence[str], where: str = "instruction") -> list[list[int]]:
        """Each word's answer tokens after `prompt` (module docstring); ValueError when the word's tokens do not
        continue the prompt's (the tokenizer merges across the boundary)."""
        tok = self.tokenizer
        base = tok(prompt, add_special_tokens=self.add_special_tokens)["input_ids"]
        out = []
        for w in words:
            ids = tok(prompt + self.answer_prefix(prompt) + w, add_special_tokens=self.add_special_tokens)["input_ids"]
            if ids[:len(base)] != base or len(ids) == len(base):
                raise ValueError(f"{where}: the label word {w!r} does not tokenize as a continuation of the prompt "
                                 "(its first token merges with the prompt's last): end the template with a "
                                 "separator such as ':' or a newline")
            out.append(list(ids[len(base):]))
        return out


def dialogue_turns(manifest: Any) -> dict[int, tuple[list[int], int]]:
    """manifest row -> (its dialogue's rows in order, its position there)."""
    out = {}
    for idx in manifest.dialogues():
        for j, i in enumerate(idx):
            out[int(i)] = (list(idx), j)
    return out
