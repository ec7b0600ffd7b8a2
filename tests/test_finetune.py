import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.finetune import FinetuneParams, InterruptTraining, TextFinetuner, write_teacher_store
from pipeline.store import FeatureStore


def params(tiny_bert, **kw):
    base = dict(weights=tiny_bert, input_format="indi_context", pooling="cls", context_window=3, max_length=48,
                lr=2e-3, warmup_steps=2, epochs=20, batch_size=8, patience=100, device="cpu", dropout=0.0,
                save_every_steps=3)
    return FinetuneParams(**{**base, **kw})


def test_finetune_loss_falls_checkpoint_reloads_and_teacher_store(tiny_bert, sample_manifest, tmp_path):
    tuner = TextFinetuner(sample_manifest, params(tiny_bert, save_every_steps=0), tmp_path / "ckpt")
    state = tuner.train(log=lambda *_: None)
    losses = [h["train_loss"] for h in state["history"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert (tmp_path / "ckpt/best/encoder/tokenizer.json").exists()
    # safetensors + JSON only: no pickle anywhere in a checkpoint
    files = {str(f.relative_to(tmp_path / "ckpt")) for f in (tmp_path / "ckpt").rglob("*") if f.is_file()}
    assert {"best/checkpoint.json", "best/classifier.safetensors", "best/encoder/model.safetensors",
            "last/training_state.safetensors", "last/training_state.json"} <= files, files
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl", ".pth"))], files
    meta = json.loads((tmp_path / "ckpt/best/checkpoint.json").read_text())
    assert meta["format_version"] == 1 and meta["labels"] == sample_manifest.meta.labels and not meta["training_state"]
    # the best checkpoint reloads (into a fresh fine-tuner) and reproduces its logits exactly
    tuner.load("best")
    rows = np.arange(len(sample_manifest))
    _, logits = tuner.predict(rows)
    fresh = TextFinetuner(sample_manifest, params(tiny_bert, save_every_steps=0), tmp_path / "ckpt")
    fresh.load("best")
    _, again = fresh.predict(rows)
    np.testing.assert_array_equal(logits, again)
    summary = write_teacher_store(fresh, "teacher", tmp_path / "teacher.h5", chunk_size=7)
    assert summary["utterances"] == len(sample_manifest)
    with FeatureStore(tmp_path / "teacher.h5") as s:
        assert s.utt_ids == sample_manifest.utt_ids
        np.testing.assert_allclose(s.logits(), logits, atol=1e-5)
        assert (s.logits().argmax(1) == logits.argmax(1)).all()
        assert s.pooled().shape == (len(sample_manifest), 32)
        assert s.attrs["weights"].endswith("best") and len(s.attrs["weights_hash"]) == 16
        assert s.attrs["labels"] == sample_manifest.meta.labels


def test_prompt_teacher_keeps_speaker_tokens(tiny_bert, sample_manifest, tmp_path):
    tuner = TextFinetuner(sample_manifest, params(tiny_bert, input_format="prompt", pooling="mask", epochs=1),
                          tmp_path / "ckpt")
    tuner.train(log=lambda *_: None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt/best/encoder")
    assert "<s1>" in tok.get_vocab() and len(tok) == len(tuner.tokenizer)


def test_interrupted_finetune_resumes_from_last_checkpoint(tiny_bert, sample_manifest, tmp_path):
    logs = []
    ref = TextFinetuner(sample_manifest, params(tiny_bert, epochs=2), tmp_path / "ref").train(log=logs.append)
    tuner = TextFinetuner(sample_manifest, params(tiny_bert, epochs=2), tmp_path / "ckpt")
    with pytest.raises(InterruptTraining):
        tuner.train(log=lambda *_: None, stop_after_steps=4)
    logs = []
    resumed = TextFinetuner(sample_manifest, params(tiny_bert, epochs=2), tmp_path / "ckpt").train(log=logs.append)
    assert any(line.startswith("resuming from") and "step 4" in line for line in logs), logs
    assert resumed["step"] == ref["step"]
    # same seed, same batches, restored optimizer/scheduler/RNG: the resumed run ends where the uninterrupted one does
    assert [h["dev_wf1"] for h in resumed["history"]] == [h["dev_wf1"] for h in ref["history"]]
    a = load_file(tmp_path / "ref/last/classifier.safetensors")
    b = load_file(tmp_path / "ckpt/last/classifier.safetensors")
    assert set(a) == {"weight", "bias"}
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    # the encoder and the optimizer state end identical too (bit for bit: same steps on the same batches)
    for f in ("encoder/model.safetensors", "training_state.safetensors"):
        a, b = load_file(tmp_path / "ref/last" / f), load_file(tmp_path / "ckpt/last" / f)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
    assert json.loads((tmp_path / "ref/last/training_state.json").read_text())["state"]["step"] == ref["step"]
    # another config does not resume from these checkpoints
    assert not TextFinetuner(sample_manifest, params(tiny_bert, epochs=3), tmp_path / "ckpt").resumable()
