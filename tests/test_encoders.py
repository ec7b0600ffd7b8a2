import numpy as np
import pandas as pd
import pytest

from pipeline.encoders import build_encoder
from pipeline.extract import extract
from pipeline.manifest import Manifest, ManifestMeta
from pipeline.store import FeatureStore

WORDS = ["the", "a", "i", "am", "so", "happy", "sad", "angry"]


def table1_manifest():
    """DialogueTRM Table 1: L = 8, speakers x1^1 x2^1 x3^2 x4^1 x5^3 x6^2 x7^1 x8^2."""
    spk = [1, 1, 2, 1, 3, 2, 1, 2]
    df = pd.DataFrame({"utt_id": [f"x{i + 1}" for i in range(8)], "dataset": "t", "split": "train",
                       "dialogue_id": "d", "turn": range(8), "speaker": [f"S{s}" for s in spk], "text": WORDS,
                       "label": "a"})
    return Manifest(df, ManifestMeta(dataset="t", root=".", labels=["a"]))


def tokens(enc, row):
    from pipeline.encoders.text import text_inputs

    pairs = enc.tokenize(text_inputs(table1_manifest(), np.array([row]), enc.config.input_format,
                                     enc.config.context_window, enc.config.speaker_tokens,
                                     sep=enc.tokenizer.sep_token, mask=enc.tokenizer.mask_token))
    return enc.tokenizer.convert_ids_to_tokens(pairs[0]["input_ids"]), pairs[0].get("token_type_ids")


def text_encoder(tiny_bert, **kw):
    cfg = {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", **kw}
    return build_encoder("t", cfg)


def test_indi_context_is_table1(tiny_bert):
    enc = text_encoder(tiny_bert, input_format="indi_context", context_window=5)
    toks, types = tokens(enc, 6)   # target x7 (speaker 1): indi-context {x2, x4}
    assert toks == ["[CLS]", "sad", "[SEP]", "a", "am", "[SEP]"]
    assert types == [0, 0, 0, 1, 1, 1]
    toks, _ = tokens(enc, 0)       # first turn: no indi-context (the tokenizer drops the empty segment)
    assert toks == ["[CLS]", "the", "[SEP]"]
    toks, _ = tokens(text_encoder(tiny_bert, input_format="indi_context", context_window=3), 6)
    assert toks == ["[CLS]", "sad", "[SEP]", "am", "[SEP]"]   # K = 3: x4..x6, of which only x4 is speaker 1


@pytest.mark.parametrize("with_context", [False, True])
def test_indi_context_long_utterance_keeps_its_start(tiny_bert, with_context):
    """A 500-token utterance fits max_length with or without context: its start kept, before any context."""
    from pipeline.encoders.text import tokenize_pairs

    enc = text_encoder(tiny_bert, input_format="indi_context", max_length=32)
    words = ("happy sad angry cake car " * 100).split()
    context = "the letter was on monday" if with_context else ""
    ids = tokenize_pairs(enc.tokenizer, [(" ".join(words), context)], "indi_context", 32)[0]
    toks = enc.tokenizer.convert_ids_to_tokens(ids["input_ids"])
    assert len(toks) == 32 and toks[0] == "[CLS]" and toks[-1] == "[SEP]" and toks.count("[SEP]") == 1
    assert toks[1:31] == words[:30]
    # a short utterance with a long context: the utterance whole, the context's newest end fills the rest
    ids = tokenize_pairs(enc.tokenizer, [("so happy", " ".join(words))], "indi_context", 32)[0]
    toks = enc.tokenizer.convert_ids_to_tokens(ids["input_ids"])
    assert len(toks) == 32 and toks[:4] == ["[CLS]", "so", "happy", "[SEP]"] and toks[4:-1] == words[-27:]
    assert ids["token_type_ids"] == [0] * 4 + [1] * 28


def test_prompt_format_speaker_tokens_and_mask(tiny_bert):
    enc = text_encoder(tiny_bert, input_format="prompt", pooling="mask")
    toks, _ = tokens(enc, 2)       # x3, spoken by the dialogue's second speaker
    assert toks == ["[CLS]", "<s1>", "the", "<s1>", "a", "<s2>", "i", "[SEP]", "now", "<s2>", "feels", "[MASK]", "[SEP]"]
    enc_k = text_encoder(tiny_bert, input_format="prompt", pooling="mask", context_window=1)
    toks, _ = tokens(enc_k, 4)     # window K=1: x4 and x5; x5's speaker is the third: <s3>
    assert toks == ["[CLS]", "<s1>", "am", "<s3>", "so", "[SEP]", "now", "<s3>", "feels", "[MASK]", "[SEP]"]
    enc_short = text_encoder(tiny_bert, input_format="prompt", pooling="mask", max_length=9)
    toks, _ = tokens(enc_short, 7)  # truncation drops the oldest history, never the prompt
    assert toks[0] == "[CLS]" and toks[-5:] == ["now", "<s2>", "feels", "[MASK]", "[SEP]"] and len(toks) == 9


def test_prompt_speaker_token_embeddings_are_the_same_on_every_load(tiny_bert):
    import torch

    from pipeline.encoders.text import load_text_model

    rows = [load_text_model(tiny_bert, None, "prompt", 4)[1].get_input_embeddings().weight[-4:] for _ in range(2)]
    torch.testing.assert_close(rows[0], rows[1], rtol=0, atol=0)
    assert rows[0].std() > 0


def test_mask_pooling_only_with_prompt(tiny_bert):
    with pytest.raises(ValueError, match="pooling 'mask'"):
        text_encoder(tiny_bert, input_format="utterance", pooling="mask")


@pytest.mark.parametrize("fmt, pooling", [("utterance", "cls"), ("indi_context", "mean"), ("prompt", "mask")])
def test_text_store(tiny_bert, sample_manifest, tmp_path, fmt, pooling):
    enc = text_encoder(tiny_bert, input_format=fmt, pooling=pooling, batch_size=5, return_sequence=True)
    extract(sample_manifest, enc, tmp_path / "a.h5", chunk_size=7)
    extract(sample_manifest, text_encoder(tiny_bert, input_format=fmt, pooling=pooling, batch_size=3,
                                          return_sequence=True), tmp_path / "b.h5", chunk_size=100)
    with FeatureStore(tmp_path / "a.h5") as a, FeatureStore(tmp_path / "b.h5") as b:
        assert a.utt_ids == sample_manifest.utt_ids
        x = a.pooled()
        assert x.shape == (len(sample_manifest), 32) and x.dtype == np.float32 and np.isfinite(x).all()
        # batching/chunking/padding do not change features (attention masks are used)
        np.testing.assert_allclose(x, b.pooled(), atol=1e-5)
        seq = a.sequence(a.utt_ids[3])
        assert seq.ndim == 2 and seq.shape[1] == 32
        # the block reader gives every row's sequence as the per-row reader does, in store order, also for a
        # subset with gaps and with blocks of a single row
        some = [a.utt_ids[i] for i in (9, 2, 3, 4, 7)]
        for ids, block in ((None, 64 << 20), (some, 64 << 20), (some, 1)):
            got = list(a.sequences(ids, block_bytes=block))
            want = a.utt_ids if ids is None else [a.utt_ids[i] for i in (2, 3, 4, 7, 9)]
            assert [u for u, _ in got] == want
            for u, v in got:
                np.testing.assert_array_equal(v, a.sequence(u))
        attrs = a.attrs
        assert attrs["weights"] == tiny_bert and len(attrs["weights_hash"]) == 16
        assert attrs["config"]["input_format"] == fmt


def test_empty_text_is_masked_or_fails(tiny_bert, tmp_path):
    df = table1_manifest().rows.copy()
    df.loc[3, "text"] = "  "
    m = Manifest(df, ManifestMeta(dataset="t", root=".", labels=["a"]))
    summary = extract(m, text_encoder(tiny_bert), tmp_path / "t.h5")
    assert [(q["utt_id"], q["problem"]) for q in summary["problems"]] == [("x4", "empty text")]
    again = extract(m, text_encoder(tiny_bert), tmp_path / "t.h5")   # up to date: a no-op that still reports
    assert again["skipped"] == "up to date" and again["problems"] == summary["problems"] and again["masked"] == 1
    with FeatureStore(tmp_path / "t.h5") as s:
        assert s.valid().tolist() == [True] * 3 + [False] + [True] * 4
        assert not s.pooled(["x4"]).any()
    with pytest.raises(ValueError, match="x4: empty text"):
        extract(m, text_encoder(tiny_bert, on_empty="fail"), tmp_path / "u.h5")


def test_opensmile_and_c3d_stores(sample_manifest, sample_media, tmp_path):
    for name, cfg, dim in [("egemaps", {"kind": "opensmile", "feature_set": "eGeMAPSv02"}, 88),
                           ("c3d", {"kind": "cnn3d", "width": 4, "out_dim": 16, "device": "cpu"}, 16)]:
        out = tmp_path / f"{name}.h5"
        extract(sample_manifest, build_encoder(name, cfg), out, sample_media, chunk_size=9)
        with FeatureStore(out) as s:
            x = s.pooled()
            assert x.shape == (len(sample_manifest), dim) and np.isfinite(x).all() and s.valid().all()
            assert s.utt_ids == sample_manifest.utt_ids
            assert x.std(0).max() > 0                    # not a constant
            if name == "c3d":
                assert s.attrs["weights"] == "random-init(seed=0)"
        again = tmp_path / f"{name}_again.h5"
        # openSMILE: in this process now (the first run used one worker process per core)
        extract(sample_manifest, build_encoder(name, {**cfg, "workers": 0} if name == "egemaps" else cfg), again,
                sample_media, chunk_size=100)
        with FeatureStore(out) as a, FeatureStore(again) as b:
            np.testing.assert_allclose(a.pooled(), b.pooled(), rtol=1e-4, atol=1e-4)  # deterministic


def test_unknown_encoder_kind_and_key():
    with pytest.raises(ValueError, match="unknown encoder kind"):
        build_encoder("x", {"kind": "nope"})
    with pytest.raises(ValueError, match="unknown key"):
        build_encoder("x", {"kind": "opensmile", "feature_sett": "eGeMAPSv02"})


def test_oom_halves_the_batch_instead_of_failing():
    import torch

    from pipeline.runtime import batched_with_oom_retry

    seen = []

    def run(rows):
        if len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        seen.append(list(rows))

    batched_with_oom_retry(np.arange(10), 8, run)
    assert sorted(i for b in seen for i in b) == list(range(10)) and max(len(b) for b in seen) == 2

    def never(rows):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):
        batched_with_oom_retry(np.arange(3), 2, never)

    # with a prepare step, the halves of a failed batch are prepared again
    prepared = []

    def prepare(rows):
        prepared.append(len(rows))
        return rows * 10

    out = []

    def run2(rows, x):
        if len(rows) > 2:
            raise torch.OutOfMemoryError("simulated")
        out.extend(x.tolist())

    batched_with_oom_retry(np.arange(6), 4, run2, prepare=prepare)
    assert sorted(out) == [0, 10, 20, 30, 40, 50] and prepared == [4, 2, 2, 2]


FORK_AFTER_DECODING = """
import gc, sys
import numpy as np
sys.path.insert(0, {repo!r})
from pipeline.media import resample_audio
from pipeline.runtime import batched_with_oom_retry
gc.disable()   # no automatic collection between decoding and the workers' fork
resample_audio(np.zeros(16000, np.float32), 16000, 8000)   # leaves a PyAV graph with its threads in a cycle
seen = []
def prepare(rows):
    gc.collect()   # in the worker, as an allocation-triggered collection would
    return rows
batched_with_oom_retry(np.arange(8), 2, lambda rows, x: seen.append(len(x)), prepare=prepare, workers=2)
print("prepared", seen)
"""


def test_prep_workers_forked_after_decoding_do_not_hang(tmp_path):
    """Garbage whose finaliser joins the parent's threads (a PyAV resampler's graph after decoding) is collected
    before the DataLoader forks its workers: collected in a worker, it waited forever (the suite hung once in
    an opensmile test with prep_workers 2)."""
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "fork.py"
    script.write_text(FORK_AFTER_DECODING.format(repo=str(REPO)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "prepared [2, 2, 2, 2]" in out.stdout, out.stderr[-2000:]


def test_compare_2016_functionals(sample_manifest, sample_media, tmp_path):
    few = Manifest(sample_manifest.rows.iloc[:3], sample_manifest.meta)
    extract(few, build_encoder("c", {"kind": "opensmile", "feature_set": "ComParE_2016"}), tmp_path / "c.h5",
            sample_media)
    with FeatureStore(tmp_path / "c.h5") as s:
        assert s.pooled().shape == (3, 6373) and np.isfinite(s.pooled()).all()
