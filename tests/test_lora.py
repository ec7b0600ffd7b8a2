"""LoRA fine-tuning (pipeline/finetune/lora.py, llm.py): on tiny random-init Llama- and Qwen2-style LLMs with a
byte-level BPE tokenizer built here (pipeline/tiny_llm.py; nothing downloaded) — only the adapters train (the
base's content unchanged, while a full fine-tune changes it), the checkpoint holds the adapter alone (a small
fraction of the model), an interrupted run resumes exactly, a pickle in an adapter folder and a base of another
hash are refused, a 4-bit request on a CPU is refused by `ercflow check`; the label-word logits at step 0 are the
hf_text encoder's zero-shot scores; an audio student takes LoRA too; and the CPU recipe runs under `dvc repro`,
with `ercflow inspect` showing adapter + base hashes and `ercflow predict` reproducing the train stage's test
predictions from base + adapter."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.configs import TextFinetuneParams
from pipeline.finetune.checkpoint import CheckpointError
from pipeline.finetune.kinds import TextFinetuner
from pipeline.finetune.lora import AdapterError, frozen_weights_hash
from pipeline.finetune.loop import InterruptTraining
from pipeline.runtime import weights_hash
from pipeline.store import FeatureStore
from pipeline.tiny_llm import save_tiny_llm

QUIET = dict(log=lambda *_: None)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_llm(request, tmp_path_factory) -> str:
    return save_tiny_llm(tmp_path_factory.mktemp(request.param), request.param, hidden_size=64)


def params(weights, **kw) -> TextFinetuneParams:
    base = dict(weights=weights, input_format="instruction", pooling="last", context_window=3, max_length=160,
                lr=5e-3, warmup_steps=2, epochs=1, batch_size=8, patience=100, device="cpu", dropout=0.0,
                save_every_steps=3, lora={"r": 2, "alpha": 4, "dropout": 0.0})
    from pipeline.params import from_dict

    return from_dict(TextFinetuneParams, {**base, **kw}, "finetune.llm")


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_only_the_adapters_train_and_the_checkpoint_is_the_adapter(tiny_llm, sample_manifest, tmp_path):
    tuner = TextFinetuner(sample_manifest, params(tiny_llm), tmp_path / "ckpt")
    base, before = frozen_weights_hash(tuner.model), lora_tensors(tuner.model)
    assert all(not v.any() for k, v in before.items() if "lora_B" in k)   # LoRA starts at the base model
    torch.manual_seed(123)   # the adapters' random A matrices come from the fine-tune's seed, not the process's RNG
    again = lora_tensors(TextFinetuner(sample_manifest, params(tiny_llm), tmp_path / "again").model)
    assert all(torch.equal(before[k], again[k]) for k in before)
    tuner.train(**QUIET)
    after = lora_tensors(tuner.model)
    assert frozen_weights_hash(tuner.model) == base   # the base (embeddings, LM head, every layer) unchanged
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert not any(p.requires_grad for n, p in tuner.model.named_parameters() if "lora_" not in n)
    # the checkpoint: the adapter and the tokenizer, no model weights; the base's content hash recorded
    enc = tmp_path / "ckpt/best/encoder"
    assert (enc / "adapter_model.safetensors").is_file() and not (enc / "model.safetensors").exists()
    assert not (tmp_path / "ckpt/best/classifier.safetensors").exists()   # label words: no new head
    meta = json.loads((tmp_path / "ckpt/best/checkpoint.json").read_text())
    assert meta["base_weights_hash"] == weights_hash(tiny_llm)
    adapter = (enc / "adapter_model.safetensors").stat().st_size
    model = (Path(tiny_llm) / "model.safetensors").stat().st_size
    assert adapter < 0.1 * model, (adapter, model)
    # the saved adapter is the trained one: a fresh fine-tuner on the base + this adapter predicts the same
    rows = np.arange(len(sample_manifest))
    tuner.load("best")
    pooled, logits = tuner.predict(rows)
    fresh = TextFinetuner(sample_manifest, params(tiny_llm), tmp_path / "ckpt")
    fresh.load("best")
    p2, l2 = fresh.predict(rows)
    np.testing.assert_array_equal(logits, l2)
    np.testing.assert_array_equal(pooled, p2)
    assert pooled.shape == (len(rows), 64) and logits.shape == (len(rows), len(sample_manifest.meta.labels))


def test_a_full_finetune_changes_the_base(tiny_llm, sample_manifest, tmp_path):
    """The check above can fail: without `lora` one step moves the base weights."""
    tuner = TextFinetuner(sample_manifest, params(tiny_llm, lora=None, classifier="linear", warmup_steps=0),
                          tmp_path / "full")
    base = frozen_weights_hash(tuner.model)
    with pytest.raises(InterruptTraining):
        tuner.train(stop_after_steps=1, **QUIET)
    assert frozen_weights_hash(tuner.model) != base


def test_linear_head_on_the_last_token_is_saved_beside_the_adapter(tiny_llm, sample_manifest, tmp_path):
    tuner = TextFinetuner(sample_manifest, params(tiny_llm, classifier="linear"), tmp_path / "ckpt")
    tuner.train(**QUIET)
    assert set(load_file(tmp_path / "ckpt/best/classifier.safetensors")) == {"weight", "bias"}
    rows = np.arange(len(sample_manifest))
    tuner.load("best")
    fresh = TextFinetuner(sample_manifest, params(tiny_llm, classifier="linear"), tmp_path / "ckpt")
    fresh.load("best")
    np.testing.assert_array_equal(tuner.predict(rows)[1], fresh.predict(rows)[1])


def test_interrupted_lora_finetune_resumes_exactly(tiny_llm, sample_manifest, tmp_path):
    kw = dict(epochs=2)
    ref = TextFinetuner(sample_manifest, params(tiny_llm, **kw), tmp_path / "ref").train(**QUIET)
    tuner = TextFinetuner(sample_manifest, params(tiny_llm, **kw), tmp_path / "ckpt")
    with pytest.raises(InterruptTraining):
        tuner.train(stop_after_steps=2, **QUIET)
    logs = []
    resumed = TextFinetuner(sample_manifest, params(tiny_llm, **kw), tmp_path / "ckpt").train(log=logs.append)
    assert any(line.startswith("resuming from") and "step 2" in line for line in logs), logs
    assert resumed["step"] == ref["step"]
    assert [h["dev_wf1"] for h in resumed["history"]] == [h["dev_wf1"] for h in ref["history"]]
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in ref["history"]])
    for f in ("encoder/adapter_model.safetensors", "training_state.safetensors"):
        a, b = load_file(tmp_path / "ref/last" / f), load_file(tmp_path / "ckpt/last" / f)
        assert set(a) == set(b) and a
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_manifest):
    """One LoRA fine-tune of the Llama-style model (its base and checkpoint copied per test)."""
    root = tmp_path_factory.mktemp("trained")
    weights = save_tiny_llm(root / "base", "llama", hidden_size=64)
    TextFinetuner(sample_manifest, params(weights, save_every_steps=0), root / "ckpt").train(**QUIET)
    return root


def test_a_pickle_in_an_adapter_folder_is_refused(trained, sample_manifest, tmp_path):
    from pipeline.finetune.lora import load_adapter

    ckpt = shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    planted = ckpt / "best/encoder/adapter_model.bin"
    planted.write_bytes(b"\x80\x04not really a pickle")
    tuner = TextFinetuner(sample_manifest, params(str(trained / "base")), ckpt)
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin: refused: a pickle file"):
        tuner.load("best")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin: refused: a pickle file in a LoRA adapter"):
        load_adapter(ckpt / "best/encoder", tuner.model.encoder, tuner.p.lora, ckpt / "best", None, None)
    planted.unlink()
    tuner.load("best")   # the same folder without it loads


def test_an_adapter_on_other_base_weights_is_refused(trained, sample_manifest, tmp_path):
    base = shutil.copytree(trained / "base", tmp_path / "base")
    ckpt = shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    meta = json.loads((ckpt / "best/checkpoint.json").read_text())
    tuner = TextFinetuner(sample_manifest, params(str(base)), ckpt)
    tuner.load("best")   # the very base (a copy: the hash is of the content, not the path)
    save_tiny_llm(base, "llama", hidden_size=64, seed=1)   # same shapes, other values
    other = TextFinetuner(sample_manifest, params(str(base)), ckpt)
    with pytest.raises(AdapterError, match=rf"content hash {meta['base_weights_hash']}, the base weights here hash "
                                           rf"to {weights_hash(str(base))}"):
        other.load("best")


def test_an_adapter_of_another_rank_is_refused(trained, sample_manifest):
    tuner = TextFinetuner(sample_manifest, params(str(trained / "base"), lora={"r": 4, "alpha": 4}), trained / "ckpt")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: r 2, this fine-tune's lora gives 4"):
        tuner.load("best")


def test_label_word_logits_at_step_zero_are_the_encoders_zero_shot_scores(trained, sample_manifest):
    """The fine-tune's logits are the hf_text encoder's label scores (the same prompt, the same words) before
    any training: one scoring, two uses."""
    from pipeline.encoders import build_encoder

    weights = str(trained / "base")
    tuner = TextFinetuner(sample_manifest, params(weights, lora=None), trained / "unused")
    rows = np.arange(len(sample_manifest))
    _, logits = tuner.predict(rows)
    enc = build_encoder("llm", {"kind": "hf_text", "weights": weights, "device": "cpu", "pooling": "last",
                                "input_format": "instruction", "context_window": 3, "max_length": 160})
    arrays, _ = enc.encode(sample_manifest.rows, sample_manifest)
    np.testing.assert_allclose(logits, arrays["logits"], atol=1e-4)
    assert np.abs(logits).max() > 1.0   # log-probabilities, not zeros


def test_a_4bit_request_on_a_cpu_is_refused_by_check(tmp_path):
    from conftest import REPO
    from ercflow.check import check_params
    from ercflow.recipe import apply_recipe

    params = apply_recipe("sample-llm-lora-cpu", yaml.safe_load((REPO / "params.yaml").read_text()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert check_params(tmp_path / "params.yaml") == []
    params["finetune"]["llm_lora"]["lora"]["quantize"] = "nf4"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    problems = check_params(tmp_path / "params.yaml")
    assert any("finetune.llm_lora" in q and "lora.quantize: nf4" in q and "CUDA only" in q for q in problems), problems


def test_an_audio_student_takes_lora(tmp_path, sample_manifest, sample_media):
    """The audio kind wraps its encoder as the text one does: adapters + classifier trained, base unchanged."""
    from conftest import save_coarse_data2vec
    from pipeline.configs import AudioFinetuneParams
    from pipeline.finetune.kinds import AudioFinetuner

    d2v = save_coarse_data2vec(tmp_path / "d2v")
    p = AudioFinetuneParams(kind="hf_audio", weights=str(d2v), device="cpu", lr=1e-2, epochs=1, batch_size=4,
                            patience=100, dropout=0.0, save_every_steps=0, max_seconds=1.0,
                            lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    tuner = AudioFinetuner(sample_manifest, p, tmp_path / "ckpt", sample_media)
    base = frozen_weights_hash(tuner.model.encoder)
    head = tuner.model.classifier.weight.detach().clone()
    tuner.train(**QUIET)
    assert frozen_weights_hash(tuner.model.encoder) == base
    assert not torch.equal(head, tuner.model.classifier.weight)
    files = {f.name for f in (tmp_path / "ckpt/best/encoder").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    tuner.close()


# --- the CPU recipe under dvc, then inspect and predict ------------------------------------------------------

def test_cpu_recipe_runs_under_dvc_and_predict_reproduces_the_test_predictions(tmp_path):
    from conftest import copy_project, dvc, sh

    root = copy_project(tmp_path / "proj")
    sh(root, sys.executable, "-m", "ercflow", "recipe", "sample-llm-lora-cpu")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sample"].update(dialogues=8, min_turns=4, max_turns=6, fps=6, size=32, max_seconds=1.2)   # faster
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "init")
    dvc(root, "repro", "train@sample-text_mlp", "train@sample-llm_scores")
    best = root / "models/sample/llm_lora/best"
    assert (best / "encoder/adapter_model.safetensors").is_file() and not (best / "encoder/model.safetensors").exists()
    base_hash = weights_hash(str(root / "data/raw/sample/tiny_llm"))
    assert json.loads((best / "checkpoint.json").read_text())["base_weights_hash"] == base_hash
    # inspect: the teacher store is fresh and shows its adapter's and its base's hashes
    out = json.loads(sh(root, sys.executable, "-m", "ercflow", "inspect", "data/features/sample/llm_lora.h5",
                        "--json"))
    report = out[0] if isinstance(out, list) else out["stores"][0]
    assert report["status"] == "fresh", report
    assert report["details"]["adapter"] and report["details"]["base_weights_hash"] == base_hash
    text = sh(root, sys.executable, "-m", "ercflow", "inspect", "data/features/sample/llm_lora.h5")
    assert f"{report['weights_hash'][:8]}+{base_hash[:8]}" in text, text
    # predict on the test dialogues: base + adapter rebuilt, the head's test predictions as the train stage wrote them
    from pipeline.manifest import Manifest

    manifest = Manifest.load(root / "data/manifest/sample")
    test = manifest.rows[manifest.rows["split"] == "test"][["utt_id", "dialogue_id", "turn", "speaker", "text"]]
    test.to_csv(root / "table.csv", index=False)
    cols = [f"p_{lab}" for lab in manifest.meta.labels]
    for head in ("text_mlp", "llm_scores"):   # the second reuses the work dir's teacher store
        sh(root, sys.executable, "-m", "ercflow", "predict", "--model", f"models/sample/{head}.safetensors",
           "--input", "table.csv", "--out", "pred.csv", "--work-dir", str(tmp_path / "work"), "--device", "cpu")
        got = pd.read_csv(root / "pred.csv").set_index("utt_id")
        want = pd.read_csv(root / f"results/sample/{head}/predictions_test.csv").set_index("utt_id")
        np.testing.assert_allclose(got.loc[want.index, cols].to_numpy(), want[cols].to_numpy(), atol=1e-4)
        assert (got.loc[want.index, "prediction"] == want["prediction"]).all()
    # llm_scores predicts what the tuned LLM's label scores say (the store's argmax)
    with FeatureStore(root / "data/features/sample/llm_lora.h5") as store:
        scored = np.asarray(manifest.meta.labels)[store.logits(list(want.index)).argmax(1)]
    assert (want["prediction"].to_numpy() == scored).all()
    # a base of other content: predict refuses it, naming both hashes
    save_tiny_llm(root / "data/raw/sample/tiny_llm", "llama", seed=1)
    fail = sh(root, sys.executable, "-m", "ercflow", "predict", "--model", "models/sample/text_mlp.safetensors",
              "--input", "table.csv", "--work-dir", str(tmp_path / "work2"), "--device", "cpu", check=False)
    assert f"trained on base weights of content hash {base_hash}" in fail, fail


def test_the_cpu_bench_runs(tmp_path):
    """bench/llm_lora_cpu.py at the smallest size: extraction tokens/s and the full / LoRA step-time ratio."""
    import subprocess

    from conftest import REPO

    out = subprocess.run([sys.executable, "bench/llm_lora_cpu.py", "--hidden", "32", "--layers", "1", "--dialogues",
                          "4", "--steps", "1", "--batch", "4", "--threads", "1", "--json", str(tmp_path / "b.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads((tmp_path / "b.json").read_text())
    assert got["extraction"]["tokens_per_s"] > 0 and got["full_over_lora"] > 0
    assert got["lora"]["trained_parameters"] < got["full"]["trained_parameters"]
    assert "full / LoRA" in out.stdout


def test_two_processes_train_the_adapters_as_one(trained, sample_manifest, tmp_path):
    """DDP (gloo, 2 CPU ranks x 4) takes the LoRA steps one process takes with batches of 8: the same train loss
    after 2 steps (tests/test_finetune.py checks the same for a full fine-tune), and one process resumes the
    2-rank `last` checkpoint to the same end."""
    from conftest import stop_two_ranks, train_loss

    weights = str(trained / "base")
    sample_manifest.save(tmp_path / "manifest")
    kw = dict(epochs=2, save_every_steps=0, lr=5e-3, warmup_steps=1)
    p2 = {**vars(params(weights, **kw)), "batch_size": 4}
    p2["lora"] = vars(p2["lora"]) if not isinstance(p2["lora"], dict) else p2["lora"]
    stop_two_ranks(tmp_path, p2, 2)
    one = TextFinetuner(sample_manifest, params(weights, **kw), tmp_path / "one")
    with pytest.raises(InterruptTraining):
        one.train(stop_after_steps=2, **QUIET)
    two = TextFinetuner(sample_manifest, params(weights, **kw), tmp_path / "two")
    assert two.fingerprint == one.fingerprint
    two.load("last")
    loss = [train_loss(t) for t in (one, two)]
    # a run on other batches (one process, batches of 4) ends elsewhere: the comparison can fail
    other = TextFinetuner(sample_manifest, params(weights, **{**kw, "batch_size": 4}), tmp_path / "other")
    with pytest.raises(InterruptTraining):
        other.train(stop_after_steps=2, **QUIET)
    apart = train_loss(other)
    print(f"train loss after 2 steps: 1 x 8 {loss[0]:.6f}, 2 x 4 {loss[1]:.6f}, 1 x 4 {apart:.6f}")
    assert loss[1] == pytest.approx(loss[0], rel=1e-4) and abs(loss[1] - loss[0]) < 0.1 * abs(apart - loss[0])
    a = load_file(tmp_path / "one/last/encoder/adapter_model.safetensors")
    b = load_file(tmp_path / "two/last/encoder/adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
