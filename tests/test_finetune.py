import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import stop_two_ranks, train_loss
from pipeline.configs import TextFinetuneParams
from pipeline.finetune.batches import length_grouped_batches, length_sorted_micro_batches
from pipeline.finetune.kinds import TextFinetuner
from pipeline.finetune.loop import InterruptTraining, params_identity
from pipeline.finetune.store_writer import write_store
from pipeline.store import FeatureStore


def params(tiny_bert, **kw):
    base = dict(weights=tiny_bert, input_format="indi_context", pooling="cls", context_window=3, max_length=48,
                lr=2e-3, warmup_steps=2, epochs=20, batch_size=8, patience=100, device="cpu", dropout=0.0,
                save_every_steps=3)
    return TextFinetuneParams(**{**base, **kw})


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
    summary = write_store(fresh, "teacher", tmp_path / "teacher.h5", chunk_size=7)
    assert summary["utterances"] == len(sample_manifest)
    with FeatureStore(tmp_path / "teacher.h5") as s:
        assert s.utt_ids == sample_manifest.utt_ids
        np.testing.assert_allclose(s.logits(), logits, atol=1e-5)
        assert (s.logits().argmax(1) == logits.argmax(1)).all()
        assert s.pooled().shape == (len(sample_manifest), 32)
        assert s.attrs["weights"].endswith("best") and len(s.attrs["weights_hash"]) == 16
        assert s.attrs["labels"] == sample_manifest.meta.labels


def test_a_context_teachers_fingerprint_follows_its_speakers_and_turn_order(tiny_bert, sample_manifest, tmp_path):
    """indi_context reads who spoke which turn: one speaker for every turn, or two turns swapped, is another
    fine-tune (it starts over, never resumes a checkpoint of the old inputs); an utterance teacher, which reads
    the text alone, keeps its fingerprint when the speakers change."""
    from pipeline.manifest import Manifest

    def tuner(manifest, fmt):
        return TextFinetuner(manifest, params(tiny_bert, input_format=fmt, epochs=1), tmp_path / fmt)

    one_voice = sample_manifest.rows.copy()
    one_voice["speaker"] = "Ross"
    swapped = sample_manifest.rows.copy()
    first = swapped.index[swapped["dialogue_id"] == swapped["dialogue_id"].iloc[0]][:2]
    swapped.loc[first, "turn"] = swapped.loc[first[::-1], "turn"].to_numpy()
    edits = [Manifest(rows, sample_manifest.meta) for rows in (one_voice, swapped)]
    base = tuner(sample_manifest, "indi_context").fingerprint
    assert len({base, *(tuner(m, "indi_context").fingerprint for m in edits)}) == 3
    assert tuner(edits[0], "utterance").fingerprint == tuner(sample_manifest, "utterance").fingerprint


def test_prompt_teacher_keeps_speaker_tokens(tiny_bert, sample_manifest, tmp_path):
    tuner = TextFinetuner(sample_manifest, params(tiny_bert, input_format="prompt", pooling="mask", epochs=1),
                          tmp_path / "ckpt")
    tuner.train(log=lambda *_: None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt/best/encoder")
    assert "<s1>" in tok.get_vocab() and len(tok) == len(tuner.tokenizer)


@pytest.mark.parametrize("batches", [{}, {"group_by_length": True},
                                     {"batch_size": 4, "grad_accum": 2, "sort_micro_batches": True}],
                         ids=["shuffled", "length_grouped", "sorted_micro_batches"])
def test_interrupted_finetune_resumes_from_last_checkpoint(tiny_bert, sample_manifest, tmp_path, batches):
    logs = []
    kw = dict(epochs=2, **batches)
    ref = TextFinetuner(sample_manifest, params(tiny_bert, **kw), tmp_path / "ref").train(log=logs.append)
    tuner = TextFinetuner(sample_manifest, params(tiny_bert, **kw), tmp_path / "ckpt")
    with pytest.raises(InterruptTraining):
        tuner.train(log=lambda *_: None, stop_after_steps=4)
    logs = []
    resumed = TextFinetuner(sample_manifest, params(tiny_bert, **kw), tmp_path / "ckpt").train(log=logs.append)
    assert any(line.startswith("resuming from") and "step 4" in line for line in logs), logs
    assert resumed["step"] == ref["step"]
    # same seed, same batches, restored optimizer/scheduler/RNG: the resumed run ends where the uninterrupted one does
    assert [h["dev_wf1"] for h in resumed["history"]] == [h["dev_wf1"] for h in ref["history"]]
    # the interrupted epoch's mean loss covers its batches from before and after the interruption
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in ref["history"]])
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


def test_length_grouped_batches_cover_every_row_once_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, 1003)
    rows = rng.permutation(1003)
    batches = length_grouped_batches(rows, lengths, 8, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1003))
    assert [len(b) for b in batches].count(8) == len(batches) - 1    # one short batch, as a plain cut has
    assert lengths[batches[0]].max() == lengths.max()                # the longest input goes first
    padded = lambda bs: sum(len(b) * lengths[b].max() for b in bs)   # noqa: E731  (tokens a batch computes)
    plain = [rows[s:s + 8] for s in range(0, 1003, 8)]
    assert padded(batches) < 0.75 * padded(plain)
    again = length_grouped_batches(rows, lengths, 8, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))   # a function of the seed


def test_length_sorted_micro_batches_keep_the_shuffled_steps_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, 1003)
    rows = rng.permutation(1003)
    micro = length_sorted_micro_batches(rows, lengths, 8, 4)
    plain = [rows[s:s + 32] for s in range(0, 1003, 32)]   # the shuffled batches of 32 that one step would take
    steps = [np.concatenate(micro[i:i + 4]) for i in range(0, len(micro), 4)]   # as the training loop groups them
    assert [sorted(x.tolist()) for x in steps] == [sorted(x.tolist()) for x in plain]
    assert all(len(m) == 8 for m in micro[:-1]) and all((np.diff(lengths[m]) <= 0).all() for m in micro)
    padded = lambda bs, n: sum(n * lengths[b].max() for b in bs)   # noqa: E731  (positions computed, full batches)
    assert padded(micro, 8) < 0.75 * padded(plain, 32)


def test_sorted_micro_batches_train_as_the_shuffled_batch(tiny_bert, sample_manifest, tmp_path, one_thread):
    """batch_size 4 x grad_accum 2 with sort_micro_batches takes the steps that batch_size 8 takes: the same rows
    per step (each micro-batch's loss weighted by its share of the step, the epoch's short last step included),
    so after 2 epochs the train loss and the weights agree with the shuffled run's (relative 1e-4: only the
    padding and the order of the sums differ), with fewer padded positions computed."""
    import shutil

    model = tmp_path / "bert"   # without dropout: the two runs' dropout draws would differ
    shutil.copytree(tiny_bert, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(cfg))
    kw = dict(dropout=0.0, epochs=2, save_every_steps=0, lr=2e-3, warmup_steps=1)
    whole = TextFinetuner(sample_manifest, params(str(model), batch_size=8, **kw), tmp_path / "whole")
    split = TextFinetuner(sample_manifest, params(str(model), batch_size=4, grad_accum=2, sort_micro_batches=True,
                                                  **kw), tmp_path / "split")
    assert len(whole.rows["train"]) % 8, "the test needs a short last step"
    padded = lambda t: sum(len(b) * t.lengths[b].max() for b in t.epoch_batches(0))   # noqa: E731
    assert padded(split) < padded(whole)
    a, b = whole.train(log=lambda *_: None), split.train(log=lambda *_: None)
    assert a["step"] == b["step"]
    assert train_loss(split) == pytest.approx(train_loss(whole), rel=1e-4)
    x, y = load_file(tmp_path / "whole/last/encoder/model.safetensors"), load_file(tmp_path / "split/last/encoder/model.safetensors")
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-3, atol=1e-5)


def test_sort_micro_batches_needs_micro_batches_and_no_grouping():
    from pipeline.params import ParamsError, from_dict

    base = {"weights": "w", "batch_size": 8}
    with pytest.raises(ParamsError, match=r"finetune\.t.*sort_micro_batches.*grad_accum"):
        from_dict(TextFinetuneParams, {**base, "sort_micro_batches": True}, "finetune.t")
    with pytest.raises(ParamsError, match=r"finetune\.t.*group_by_length"):
        from_dict(TextFinetuneParams, {**base, "grad_accum": 4, "sort_micro_batches": True, "group_by_length": True},
                  "finetune.t")
    assert from_dict(TextFinetuneParams, {**base, "grad_accum": 4, "sort_micro_batches": True}, "finetune.t").grad_accum == 4


def test_group_by_length_epochs_and_fingerprints(tiny_bert, sample_manifest, tmp_path):
    plain = TextFinetuner(sample_manifest, params(tiny_bert), tmp_path / "a")
    grouped = TextFinetuner(sample_manifest, params(tiny_bert, group_by_length=True, batch_size=4), tmp_path / "b")
    train = set(grouped.rows["train"].tolist())
    for epoch in (0, 1):
        batches = grouped.epoch_batches(epoch)
        assert sorted(np.concatenate(batches).tolist()) == sorted(train)
    assert not all(np.array_equal(a, b) for a, b in zip(grouped.epoch_batches(0), grouped.epoch_batches(1)))
    # off (the default), the option is left out of the fingerprints: checkpoints and teacher stores written
    # before it existed stay resumable / up to date; on, it makes a run of its own
    assert "group_by_length" not in params_identity(plain.p)
    assert params_identity(grouped.p)["group_by_length"] is True
    assert plain.fingerprint != TextFinetuner(sample_manifest, params(tiny_bert, group_by_length=True),
                                              tmp_path / "c").fingerprint


def test_progress_bar_and_no_transformers_bars(tiny_bert, sample_manifest, tmp_path, monkeypatch, capfd):
    import io

    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    import pipeline.finetune.loop as ft

    out = io.StringIO()
    bars = []

    def bar(**kw):
        bars.append(tqdm(file=out, mininterval=0, **kw))
        return bars[-1]

    monkeypatch.setattr(ft, "progress", bar)
    hf_logging.enable_progress_bar()   # as with -v: transformers' own bars on
    try:
        tuner = TextFinetuner(sample_manifest, params(tiny_bert, epochs=1, save_every_steps=2), tmp_path / "ckpt")
        capfd.readouterr()   # the base model's own loading (pipeline/encoders/text.py) is not this test's
        lines = []
        state = tuner.train(log=lines.append)
        tuner.load("best")
        assert hf_logging.is_progress_bar_enabled()   # restored after each save and load
    finally:
        hf_logging.disable_progress_bar()
    assert bars[0].total == state["step"] and bars[0].n == state["step"]
    text = out.getvalue()
    assert "step/s" in text and "loss=" in text, text[-500:]
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err, err[-500:]
    assert "steps/s" in lines[-1] and state["history"][0]["train_seconds"] > 0, lines


def test_two_processes_train_as_one_with_twice_the_batch_and_resume_across_world_sizes(tiny_bert, sample_manifest,
                                                                                       tmp_path, one_thread):
    """DistributedDataParallel (gloo, 2 CPU processes, batch_size 4 each) takes the steps one process takes with
    batch_size 8: same global batches, the ranks' losses weighted by their share of each batch, gradients
    averaged. After 3 steps both have the same train loss (relative tolerance 1e-4: gloo's sum of the two
    gradients and the shorter padding of each half differ from one process's sums in the last bits). The
    2-process `last` checkpoint (global batch 8, the run's identity) is then resumed by one process with
    batch_size 8 and ends where the single process ends."""
    import shutil

    model = tmp_path / "bert"   # a tiny BERT without dropout: the ranks' dropout draws would differ from one process's
    shutil.copytree(tiny_bert, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(cfg))
    sample_manifest.save(tmp_path / "manifest")
    kw = dict(weights=str(model), dropout=0.0, epochs=2, batch_size=8, save_every_steps=0, lr=2e-3, warmup_steps=1)
    stop = 3

    stop_two_ranks(tmp_path, {**dict(input_format="indi_context", pooling="cls", context_window=3, max_length=48,
                                     patience=100, device="cpu"), **kw, "batch_size": 4}, stop)

    one = TextFinetuner(sample_manifest, params(tiny_bert, **kw), tmp_path / "one")
    with pytest.raises(InterruptTraining):
        one.train(log=lambda *_: None, stop_after_steps=stop)
    two = TextFinetuner(sample_manifest, params(tiny_bert, **kw), tmp_path / "two")
    assert two.fingerprint == one.fingerprint   # 2 x 4 and 1 x 8: one run
    two.load("last")
    loss_two, loss_one = train_loss(two), train_loss(one)
    print(f"train loss after {stop} steps: 2 x 4 {loss_two:.8f}, 1 x 8 {loss_one:.8f}")
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    state = json.loads((tmp_path / "two/last/training_state.json").read_text())
    assert state["state"]["step"] == stop and len(state["rng_ranks"]) == 2   # every rank's RNG state kept

    logs = []
    end_two = TextFinetuner(sample_manifest, params(tiny_bert, **kw), tmp_path / "two").train(log=logs.append)
    assert any(line.startswith("resuming from") and f"step {stop}" in line for line in logs), logs
    end_one = TextFinetuner(sample_manifest, params(tiny_bert, **kw), tmp_path / "one").train(log=lambda *_: None)
    assert end_two["step"] == end_one["step"]
    a, b = load_file(tmp_path / "one/last/encoder/model.safetensors"), load_file(tmp_path / "two/last/encoder/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_the_finetune_stage_runs_itself_under_torchrun(tiny_bert, sample_manifest, tmp_path):
    """`finetune.<teacher>.procs: 2`: `python -m stages.finetune_text` (what dvc runs) relaunches itself as 2
    ranks; rank 0 keeps the checkpoints and the teacher store, whose rows, logits and summary say 2 processes."""
    import os
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    project = tmp_path / "project"
    sample_manifest.save(project / "data/manifest/sample")
    teacher = dict(weights=tiny_bert, input_format="indi_context", pooling="cls", context_window=3, max_length=48,
                   lr=2e-3, warmup_steps=1, epochs=1, batch_size=4, device="cpu", save_every_steps=0, procs=2)
    (project / "params.yaml").write_text(yaml.safe_dump({"finetune": {"t": teacher}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "ERCFLOW_DIST_TIMEOUT": "120"}
    out = subprocess.run([sys.executable, "-m", "stages.finetune_text", "--dataset", "sample", "--teacher", "t"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fine-tune t: 2 processes" in out.stderr, out.stderr[-2000:]
    summary = json.loads((project / "data/features/sample/t.summary.json").read_text())
    assert summary["finetune"]["processes"] == 2 and summary["finetune"]["global_batch"] == 8
    with FeatureStore(project / "data/features/sample/t.h5") as s:
        n_labels = len(sample_manifest.meta.labels)
        assert s.utt_ids == sample_manifest.utt_ids and s.logits(s.utt_ids).shape == (len(sample_manifest), n_labels)
    meta = json.loads((project / "models/sample/t/best/checkpoint.json").read_text())
    single = {**{k: v for k, v in teacher.items() if k != "procs"}, "batch_size": 8}
    # 2 processes x 4 is the run of 1 x 8
    assert meta["fingerprint"] == TextFinetuner(sample_manifest, TextFinetuneParams(**single), tmp_path / "one").fingerprint
