import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def seeded_rngs():
    """Every test starts from the same global RNG state, so no test depends on the ones run before it."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A tiny random-init BERT + WordPiece tokenizer saved to a temp dir (loaded back through from_pretrained)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    words = ("the a i am so happy sad angry about this is it was on my you we me not what why how now feels "
             "cake car letter monday friday okay hmm well tell more meeting report bus love great furious "
             "cry lost ada ben said yes no").split()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(letters + ".,!?'") + words
             + [f"##{c}" for c in letters])   # any lower-case word splits into pieces: no [UNK] text
    (d / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tok = BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(d)
    import torch

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=256))
    model.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """A small bundled-sample dataset (6 dialogues), generated once per session."""
    from pipeline.datasets.sample import generate
    from pipeline.params import SampleParams

    d = tmp_path_factory.mktemp("sample")
    generate(d, SampleParams(dialogues=6, min_turns=4, max_turns=6, seed=1))
    return d


@pytest.fixture(scope="session")
def sample_manifest(sample_dir):
    from pipeline.datasets import build_manifest
    from pipeline.params import DatasetParams

    manifest, problems = build_manifest("sample", DatasetParams(adapter="sample", root=str(sample_dir)))
    assert problems == []
    return manifest


@pytest.fixture(scope="session")
def sample_media(sample_manifest, tmp_path_factory) -> Path:
    from pipeline.media import decode_dataset
    from pipeline.params import DecodeParams

    out = tmp_path_factory.mktemp("media") / "sample.h5"
    decode_dataset(sample_manifest, out, DecodeParams(frames=4, size=32, chunk_size=8))
    return out
