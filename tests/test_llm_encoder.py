"""Decoder-only LLMs in `hf_text`: `last` pooling, the `instruction` prompt, label scoring into `logits`, and the
bitsandbytes options' refusal off CUDA — on tiny random-init Llama- and Qwen2-style models with a word-level
tokenizer built here (no download)."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.encoders import build_encoder
from pipeline.extract import extract
from pipeline.manifest import Manifest, ManifestMeta
from pipeline.params import ParamsError
from pipeline.store import FeatureStore

TEXTS = ["i am so happy today", "the cake was lost", "why", "tell me more about the letter", "okay",
         "we love the great report", "not now", "i am furious about the bus"]
SPEAKERS = ["Ada", "Ben", "Ada", "Ben", "Cy", "Ada", "Ben", "Ada"]
LABELS = ["neutral", "joy", "sad"]
TEMPLATE = "{history}\n{speaker}: {utterance}\nOne of {labels}? Answer:"
CHAT = ("{% for m in messages %}<|user|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIALS = ["<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]


def dialogue_manifest() -> Manifest:
    n = len(TEXTS)
    df = pd.DataFrame({"utt_id": [f"u{i}" for i in range(n)], "dataset": "t", "split": "train",
                       "dialogue_id": ["d1"] * 5 + ["d2"] * 3, "turn": [0, 1, 2, 3, 4, 0, 1, 2],
                       "speaker": SPEAKERS, "text": TEXTS, "label": [LABELS[i % 3] for i in range(n)]})
    return Manifest(df, ManifestMeta(dataset="t", root=".", labels=list(LABELS)))


def save_tokenizer(path, chat: bool = False, bpe: bool = False, qwen2: bool = False):
    """A tokenizer without a padding token (decoder-style): word-level (whitespace + punctuation split, a BOS
    first), or a byte-level BPE trained here on the test's words (as GPT-2's and Qwen's are; no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = " ".join(TEXTS + SPEAKERS + LABELS + [TEMPLATE, "very One Answer of Now you are an expert in sentiment "
                                                  "and emotional analysis The following conversation involves "
                                                  "several speakers Select the label last utterance from s , . ?"])
    if bpe:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator([words] * 3 + TEXTS, trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    else:
        vocab = {t: i for i, t in enumerate(SPECIALS)}
        for w in pre_tokenizers.Whitespace().pre_tokenize_str(words):
            vocab.setdefault(w[0], len(vocab))
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", 1)])
    if qwen2:   # as Qwen2's own tokenizer class (transformers loads a qwen2 model's tokenizer as that class)
        import json

        from transformers import Qwen2Tokenizer

        model = json.loads(tok.to_str())["model"]
        fast = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], unk_token="<unk>",
                              bos_token=None, eos_token="<eos>", pad_token=None,
                              additional_special_tokens=SPECIALS[3:])
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                       additional_special_tokens=SPECIALS[3:])
    if chat:
        fast.chat_template = CHAT
    fast.save_pretrained(path)
    return fast


def save_tiny_llm(path, family: str = "llama", chat: bool = False) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from transformers import GPT2Config, GPT2LMHeadModel

    tok = save_tokenizer(path, chat, bpe=family != "llama", qwen2=family == "qwen2")
    shape = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":   # learned absolute positions: padding shows unless position ids skip it
        shape = dict(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                     eos_token_id=2, tie_word_embeddings=False)
    cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config),
                "gpt2": (GPT2LMHeadModel, GPT2Config)}[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(cfg(**shape))
    with torch.no_grad():   # logits far from uniform, so that a wrong position or token shows
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_llm(request, tmp_path_factory) -> str:
    return save_tiny_llm(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    return save_tiny_llm(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="module")
def word_llm(tmp_path_factory) -> str:
    """Llama-style with the word-level tokenizer: its tokens are the words, for token-exact tests."""
    return save_tiny_llm(tmp_path_factory.mktemp("word"), "llama")


@pytest.fixture(scope="module")
def tiny_chat_llm(tmp_path_factory) -> str:
    return save_tiny_llm(tmp_path_factory.mktemp("chat"), "llama", chat=True)


def llm(weights, **kw):
    return build_encoder("llm", {"kind": "hf_text", "weights": weights, "device": "cpu", "pooling": "last", **kw})


def encode(enc, manifest=None):
    manifest = manifest or dialogue_manifest()
    arrays, _ = enc.encode(manifest.rows, manifest)
    return arrays


# --- last-token pooling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["utterance", "instruction"])
def test_last_pooling_is_the_same_under_left_and_right_padding(tiny_llm, fmt):
    kw = {"input_format": fmt, "batch_size": 8} | ({"instruction": TEMPLATE, "max_length": 40}
                                                   if fmt == "instruction" else {})
    enc = llm(tiny_llm, **kw)
    assert enc.tokenizer.padding_side == "left" and enc.tokenizer.pad_token == "<eos>"   # EOS pads: no pad token
    left = encode(enc)
    enc.tokenizer.padding_side = "right"
    right = encode(enc)
    alone = encode(llm(tiny_llm, **{**kw, "batch_size": 1}))   # no padding at all
    for other in (right, alone):
        np.testing.assert_allclose(left["pooled"], other["pooled"], atol=1e-5)
        if fmt == "instruction":
            np.testing.assert_allclose(left["logits"], other["logits"], atol=1e-4)
    # it is the last token: the mean over the tokens is another feature
    mean = encode(llm(tiny_llm, **{**kw, "pooling": "mean"}))
    assert np.abs(mean["pooled"] - left["pooled"]).max() > 1e-2


def test_gpt2_style_absolute_positions_ignore_the_padding(tiny_gpt2):
    """GPT-2's positions are learned and absolute (RoPE's are relative, so a shift by left padding changes
    nothing there): only position ids counted over the real tokens make a padded row match its unpadded self."""
    enc = llm(tiny_gpt2, input_format="instruction", instruction=TEMPLATE, batch_size=8)
    left = encode(enc)
    alone = encode(llm(tiny_gpt2, input_format="instruction", instruction=TEMPLATE, batch_size=1))
    np.testing.assert_allclose(left["pooled"], alone["pooled"], atol=1e-5)
    np.testing.assert_allclose(left["logits"], alone["logits"], atol=1e-4)
    enc.tokenizer.padding_side = "right"
    np.testing.assert_allclose(encode(enc)["logits"], alone["logits"], atol=1e-4)


def test_last_pooling_is_the_final_hidden_state_of_the_last_token(tiny_llm):
    from transformers import AutoModelForCausalLM

    enc = llm(tiny_llm, batch_size=8)
    got = encode(enc)["pooled"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    for i, text in enumerate(TEXTS):
        ids = enc.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            want = model(**ids, output_hidden_states=True).hidden_states[-1][0, -1]
        np.testing.assert_allclose(got[i], want.numpy(), atol=1e-5)


@pytest.mark.parametrize("fmt", ["utterance", "instruction"])
def test_all_layers_of_a_decoder(tiny_llm, fmt):
    """`layers: all`: embeddings + 2 layers, the last the final norm's output (= `layers: last`), with or
    without the LM head's pass (label scoring)."""
    kw = {"input_format": fmt} | ({"instruction": TEMPLATE} if fmt == "instruction" else {})
    every = encode(llm(tiny_llm, layers="all", **kw))["pooled"]
    last = encode(llm(tiny_llm, **kw))["pooled"]
    assert every.shape == (len(TEXTS), 3, 32)
    np.testing.assert_allclose(every[:, -1], last, atol=1e-5)
    assert np.abs(every[:, 1] - every[:, -1]).max() > 1e-2


def test_cls_pooling_is_refused_on_a_decoder(tiny_llm):
    with pytest.raises(ParamsError, match="pooling 'cls' on a decoder-only model"):
        llm(tiny_llm, pooling="cls")


# --- the instruction prompt -------------------------------------------------------------------------------

def prompt_tokens(enc, row: int, manifest=None) -> list[str]:
    manifest = manifest or dialogue_manifest()
    enc.instruction_inputs(manifest)
    return enc.tokenizer.convert_ids_to_tokens(enc.instruction_tokens(np.array([row]))[0]["input_ids"])


def test_instruction_prompt_is_token_exact(word_llm):
    tiny_llm = word_llm
    enc = llm(tiny_llm, input_format="instruction", instruction=TEMPLATE)
    tail = ["One", "of", "neutral", ",", "joy", ",", "sad", "?", "Answer", ":"]
    # u3 (Ben): the dialogue's three earlier turns, speaker-tagged, oldest first; the target; the labels named
    assert prompt_tokens(enc, 3) == (["<bos>", "Ada", ":", "i", "am", "so", "happy", "today",
                                      "Ben", ":", "the", "cake", "was", "lost", "Ada", ":", "why",
                                      "Ben", ":", "tell", "me", "more", "about", "the", "letter"] + tail)
    assert prompt_tokens(enc, 5) == ["<bos>", "Ada", ":", "we", "love", "the", "great", "report"] + tail  # first turn
    # the window: the last K turns
    enc2 = llm(tiny_llm, input_format="instruction", instruction=TEMPLATE, context_window=1)
    assert prompt_tokens(enc2, 3) == ["<bos>", "Ada", ":", "why", "Ben", ":", "tell", "me", "more", "about", "the",
                                      "letter"] + tail
    # the budget: 26 tokens keep the newest turn only (27 would need "Ben : the cake was lost" too: 33)
    short = llm(tiny_llm, input_format="instruction", instruction=TEMPLATE, max_length=26)
    toks = prompt_tokens(short, 3)
    assert toks == ["<bos>", "Ada", ":", "why", "Ben", ":", "tell", "me", "more", "about", "the", "letter"] + tail
    assert len(toks) == 22
    longer = llm(tiny_llm, input_format="instruction", instruction=TEMPLATE, max_length=27)
    assert prompt_tokens(longer, 3)[:6] == ["<bos>", "Ada", ":", "why", "Ben", ":"]
    just = llm(tiny_llm, input_format="instruction", instruction=TEMPLATE, max_length=28)
    assert prompt_tokens(just, 3)[:6] == ["<bos>", "Ben", ":", "the", "cake", "was"]
    # a budget below the target alone: no history, the target whole (over the budget rather than cut)
    tiny = llm(tiny_llm, input_format="instruction", instruction=TEMPLATE, max_length=5)
    assert prompt_tokens(tiny, 3) == ["<bos>", "Ben", ":", "tell", "me", "more", "about", "the", "letter"] + tail


def test_instruction_prompt_with_a_chat_template_and_verbaliser(tiny_chat_llm):
    enc = llm(tiny_chat_llm, input_format="instruction", instruction=TEMPLATE, context_window=1,
              label_words={"sad": "very sad"})
    toks = prompt_tokens(enc, 2)
    # the chat rendering carries the special tokens (no BOS added again), ending at the assistant header
    assert toks == ["<|user|>", "Ben", ":", "the", "cake", "was", "lost", "Ada", ":", "why", "One", "of", "neutral",
                    ",", "joy", ",", "very", "sad", "?", "Answer", ":", "<|assistant|>"]
    ids = enc.tokenizer.convert_tokens_to_ids
    assert enc.label_ids == [[ids("neutral")], [ids("joy")], [ids("very"), ids("sad")]]


def test_target_mean_pools_the_target_utterance_of_the_instruction(word_llm):
    enc = llm(word_llm, input_format="instruction", instruction=TEMPLATE, pooling="target_mean")
    manifest = dialogue_manifest()
    enc.instruction_inputs(manifest)
    row = enc.instruction_tokens(np.array([3]))[0]
    marked = [t for t, m in zip(enc.tokenizer.convert_ids_to_tokens(row["input_ids"]), row["target_mask"]) if m]
    assert marked == ["tell", "me", "more", "about", "the", "letter"]


@pytest.mark.parametrize("raw, match", [
    ({"instruction": "{history} {utterance} {labels} {mood}? Answer:"}, r"unknown placeholder.*\{mood\}"),
    ({"instruction": "{history} Answer: {labels}"}, r"must contain \{utterance\}"),
    ({"instruction": "{labels} Answer: {utterance}"}, "must end with the question"),
    ({"instruction": "{utterance} {labels"}, "not a valid template"),
    ({"input_format": "utterance", "instruction": TEMPLATE}, "an option of input_format 'instruction'"),
    ({"pooling": "cls"}, "input_format 'instruction' is pooled at its last token"),
])
def test_bad_instruction_options_are_params_errors(tiny_llm, raw, match):
    with pytest.raises(ParamsError, match=match):
        llm(tiny_llm, **{"input_format": "instruction", **raw})


def test_instruction_needs_a_decoder(tiny_bert):
    with pytest.raises(ParamsError, match="input_format: 'instruction' scores label words"):
        llm(tiny_bert, input_format="instruction")


def test_a_verbaliser_key_that_is_no_label_is_refused(tiny_llm):
    enc = llm(tiny_llm, input_format="instruction", instruction=TEMPLATE, label_words={"joyy": "glad"})
    with pytest.raises(ParamsError, match=r"encoders.llm.label_words: \['joyy'\] are not labels"):
        encode(enc)


# --- label scoring ----------------------------------------------------------------------------------------

def hand_scores(weights, prompt: str, label_ids: list[list[int]], tokenizer) -> np.ndarray:
    """Summed log-probabilities of each label's tokens after `prompt`, from one unpadded pass over
    prompt + label (the model's own logits, position by position)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weights).eval()
    base = tokenizer(prompt)["input_ids"]
    out = []
    for ids in label_ids:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([base + ids])).logits[0]
        logp = torch.log_softmax(logits, -1)
        out.append(sum(float(logp[len(base) - 1 + k, t]) for k, t in enumerate(ids)))
    return np.array(out)


def test_label_scores_are_the_models_log_probabilities(tiny_llm):
    enc = llm(tiny_llm, input_format="instruction", instruction=TEMPLATE, batch_size=3,
              label_words={"sad": "very sad", "joy": "happy today"})
    got = encode(enc)["logits"]
    # the answer's tokens: words for the word-level tokenizer; byte-level BPE pieces (" neutral" in 3) for Qwen2's
    assert [enc.tokenizer.decode(ids).strip() for ids in enc.label_ids] == ["neutral", "happy today", "very sad"]
    assert all(len(ids) > 1 for ids in enc.label_ids[1:]) and len(enc.label_ids[0]) >= 1
    assert got.shape == (len(TEXTS), 3) and (got < 0).all()
    for row in (0, 3, 7):
        want = hand_scores(tiny_llm, enc._inputs[row][0], enc.label_ids, enc.tokenizer)
        np.testing.assert_allclose(got[row], want, atol=1e-4)
    # a multi-token label's later tokens count: scoring its first token alone gives another number
    first_only = enc.label_ids[2][:1]
    assert abs(hand_scores(tiny_llm, enc._inputs[0][0], [first_only], enc.tokenizer)[0] - got[0, 2]) > 1e-3


def test_zero_shot_store_end_to_end(tiny_llm, tmp_path):
    from pipeline.extract import extract_inputs, run_fingerprint
    from pipeline.inspect import planned_provenance

    raw = {"kind": "hf_text", "weights": tiny_llm, "device": "cpu", "pooling": "last",
           "input_format": "instruction", "batch_size": 3, "max_length": 64, "label_words": {"sad": "very sad"}}
    manifest = dialogue_manifest()
    summary = extract(manifest, build_encoder("llm", raw), tmp_path / "llm.h5", chunk_size=3)
    assert summary["problems"] == []
    again = extract(manifest, build_encoder("llm", {**raw, "batch_size": 8}), tmp_path / "again.h5")
    with FeatureStore(tmp_path / "llm.h5") as s, FeatureStore(tmp_path / "again.h5") as b:
        z = s.logits()
        assert z.shape == (len(TEXTS), 3) and np.isfinite(z).all() and s.pooled().shape == (len(TEXTS), 32)
        np.testing.assert_allclose(z, b.logits(), atol=1e-4)   # chunks and batches change nothing
        assert s.attrs["labels"] == LABELS and s.attrs["label_words"] == ["neutral", "joy", "very sad"]
        assert s.attrs["model_type"] in ("llama", "qwen2") and s.attrs["config"]["input_format"] == "instruction"
        # `ercflow inspect` plans the same fingerprint without loading the model
        planned = planned_provenance("llm", raw, s.attrs, manifest)
        assert run_fingerprint(planned, extract_inputs(manifest, False, None)) == s.attrs["fingerprint"]
    assert again["problems"] == []
    # the labels are part of the fingerprint: a renamed label re-scores
    other = Manifest(manifest.rows.replace({"label": {"sad": "sadness"}}),
                     ManifestMeta(dataset="t", root=".", labels=["neutral", "joy", "sadness"]))
    redo = extract(other, build_encoder("llm", {**raw, "label_words": None}), tmp_path / "llm.h5")
    assert redo.get("skipped") != "up to date"


# --- fingerprints, precision and quantisation options ------------------------------------------------------

def test_existing_configs_keep_their_provenance(tiny_bert):
    enc = build_encoder("t", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu"})
    config = enc.provenance()["config"]
    assert not {"weights_dtype", "instruction", "label_words"} & set(config)
    assert config["quantize"] == "none" and enc.manifest_provenance(dialogue_manifest()) == {}
    bf16 = build_encoder("t", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "weights_dtype": "bf16"})
    assert bf16.provenance()["config"]["weights_dtype"] == "bf16"   # away from its default it is recorded


@pytest.mark.parametrize("quantize", ["nf4", "int8_bnb"])
def test_bitsandbytes_on_a_cpu_is_refused_by_check(tiny_llm, quantize):
    from ercflow.check import head_options
    from pipeline.params import validate_params
    from conftest import BASE

    raw = copy.deepcopy(BASE)
    raw["encoders"]["text_minilm"].update(quantize=quantize, device="cpu")
    problems = validate_params(raw, head_options())[1]
    assert len(problems) == 1 and problems[0].startswith("encoders.text_minilm: quantize: " + quantize)
    assert "CUDA only" in problems[0]
    raw["encoders"]["text_minilm"]["quantize"] = "none"
    assert validate_params(raw, head_options())[1] == []
    with pytest.raises(ParamsError, match=f"quantize: {quantize} loads the weights through bitsandbytes"):
        llm(tiny_llm, quantize=quantize)
    if not torch.cuda.is_available():   # device auto on a machine without CUDA
        raw["encoders"]["text_minilm"].update(quantize=quantize, device="auto")
        assert "this machine has no CUDA" in validate_params(raw, head_options())[1][0]


def test_instruction_options_are_checked_by_check():
    from ercflow.check import head_options
    from pipeline.params import validate_params
    from conftest import BASE

    raw = copy.deepcopy(BASE)
    raw["encoders"]["text_minilm"].update(input_format="instruction", pooling="last", instruction="{utterance}?")
    problems = validate_params(raw, head_options())[1]
    assert problems == ["encoders.text_minilm: instruction: the template must contain {labels}"]
