"""A tiny random-init decoder-only LLM (Llama- or Qwen2-style) with a byte-level BPE tokenizer trained here with
the `tokenizers` library: nothing is downloaded. It runs the LLM mechanism (instruction prompt, label scoring,
LoRA fine-tune, adapter checkpoints, predict) end to end on a CPU in seconds: the sample's `tiny_llm` option
writes one beside the sample dataset (data/raw/sample/tiny_llm; recipes/sample-llm-lora-cpu.yaml), and the
tests and bench/llm_lora_cpu.py build their own. Its outputs mean nothing: it was never trained on text.

Everything is a function of the arguments (seeded init, a deterministic BPE training), so two runs write the same
files, and the weights' content hash (pipeline/runtime.py) is stable.
"""
from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "qwen2")
SPECIALS = ["<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
# a chat template in the ChatML manner (as Qwen's): the user's message, then the assistant header, where the
# answer starts
CHAT_TEMPLATE = ("{% for m in messages %}<|user|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def corpus() -> list[str]:
    """What the tokenizer learns its merges from: the default instruction prompt and the sample's words (any
    other text still tokenizes: a byte-level BPE has no unknown token)."""
    from pipeline.datasets.sample import EMOTION_TEXT, FILLER_TEXT, LABELS, SLOTS, SPEAKER_NAMES
    from pipeline.prompts import DEFAULT_INSTRUCTION

    texts = [DEFAULT_INSTRUCTION, " ".join(LABELS), " ".join(SPEAKER_NAMES), " ".join(FILLER_TEXT),
             " ".join(w for words in SLOTS.values() for w in words)]
    texts += [" ".join(v) for v in EMOTION_TEXT.values()]
    return texts * 3


def build_tokenizer(family: str = "llama", vocab_size: int = 512, chat: bool = False, texts: list[str] | None = None):
    """A byte-level BPE tokenizer without a padding token (as decoder-only LLMs' are), as the family's
    transformers class: a BOS first for Llama; none for Qwen2 (as theirs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts or corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if family == "qwen2":
        import json

        from transformers import Qwen2Tokenizer

        model = json.loads(tok.to_str())["model"]
        fast = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                                             for m in model["merges"]],
                              unk_token="<unk>", bos_token=None, eos_token="<eos>", pad_token=None,
                              additional_special_tokens=SPECIALS[3:])
    else:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", SPECIALS.index("<bos>"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                       additional_special_tokens=SPECIALS[3:])
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(family: str, vocab_size: int, hidden_size: int = 32, layers: int = 2, seed: int = 0):
    """A random-init causal LM of `family` (llama | qwen2): 4 heads, 2 key-value heads (grouped-query attention,
    as Llama-3 and Qwen2 have), an LM head apart from the embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"tiny LLM family {family!r}: one of {FAMILIES}")
    cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[family]
    config = cfg(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=False, bos_token_id=SPECIALS.index("<bos>"), eos_token_id=SPECIALS.index("<eos>"))
    with torch.random.fork_rng(devices=[]):   # a fixed draw, without touching the caller's RNG
        torch.manual_seed(seed)
        return cls(config)


def save_tiny_llm(path: str | Path, family: str = "llama", hidden_size: int = 32, layers: int = 2, seed: int = 0,
                  chat: bool = False) -> str:
    """Write the tokenizer and a random-init model of `family` to `path` (safetensors); returns the path."""
    path = Path(path)
    tokenizer = build_tokenizer(family, chat=chat)
    model = build_model(family, len(tokenizer), hidden_size, layers, seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)
