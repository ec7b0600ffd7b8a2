"""Several hidden layers per store (`layers: all | [i, ...]`), the heads' learned layer mix (LayerMix), and
`target_mean` pooling of the context formats."""

import numpy as np
import pandas as pd
import pytest
import torch

from heads.registry import build_head
from heads.data import CachedDialogues
from heads.layers import LayerMix
from pipeline.encoders import build_encoder
from pipeline.extract import extract, extract_inputs, run_fingerprint
from pipeline.manifest import Manifest, ManifestMeta
from pipeline.params import ParamsError
from pipeline.store import FeatureStore, fingerprint
from conftest import save_tiny_speech_model
from conftest import HEADS
from conftest import overfit, store_from, synthetic_manifest
from conftest import save_tiny_timesformer


# --- all-layer stores -------------------------------------------------------------------------------------

def check_layered_store(path, last_path, n_rows, n_states, dim, seq=False):
    """A `layers: all` store: [N, L, D], `layers` attribute, its last layer the `layers: last` store's rows."""
    with FeatureStore(path) as a, FeatureStore(last_path) as b:
        x = a.pooled()
        assert x.shape == (n_rows, n_states, dim) and np.isfinite(x).all() and a.dim == dim
        assert a.layers == a.attrs["layers"] == list(range(n_states))
        assert a.attrs["config"]["layers"] == "all" and a.attrs["dim"] == dim
        assert b.layers is None and "layers" not in b.attrs and b.pooled().shape == (n_rows, dim)
        # `layers: last` is left out of the provenance: the config hash is the one stores always had
        assert "layers" not in b.attrs["config"] and b.attrs["config_hash"] == fingerprint(b.attrs["config"])
        assert (x[:, 0] != x[:, -1]).any()                                  # the layers differ
        if seq:
            u = a.utt_ids[2]
            assert a.sequence(u).shape[1:] == (n_states, dim)
            np.testing.assert_allclose(a.sequence(u)[:, -1], b.sequence(u), atol=1e-5)
        return x, b.pooled()


def test_text_all_layer_store(tiny_bert, sample_manifest, tmp_path):
    cfg = {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "pooling": "mean", "return_sequence": True}
    extract(sample_manifest, build_encoder("t", {**cfg, "layers": "all"}), tmp_path / "all.h5", chunk_size=7)
    extract(sample_manifest, build_encoder("t", cfg), tmp_path / "last.h5")
    x, last = check_layered_store(tmp_path / "all.h5", tmp_path / "last.h5", len(sample_manifest), 3, 32, seq=True)
    np.testing.assert_allclose(x[:, -1], last, atol=1e-5)   # BERT: hidden_states[-1] is last_hidden_state
    # a list picks (and orders) hidden_states indices; one layer is a [N, D] store that names it
    extract(sample_manifest, build_encoder("t", {**cfg, "layers": [-1, 0]}), tmp_path / "two.h5")
    extract(sample_manifest, build_encoder("t", {**cfg, "layers": [1]}), tmp_path / "one.h5")
    with FeatureStore(tmp_path / "two.h5") as two, FeatureStore(tmp_path / "one.h5") as one:
        assert two.layers == [2, 0] and two.attrs["config"]["layers"] == [-1, 0]
        np.testing.assert_allclose(two.pooled(), x[:, [2, 0]], atol=1e-5)
        assert one.layers is None and one.attrs["layers"] == [1] and one.pooled().shape == (len(sample_manifest), 32)
        np.testing.assert_allclose(one.pooled(), x[:, 1], atol=1e-5)


def test_planned_provenance_matches_the_layered_store(tiny_bert, sample_manifest, tmp_path):
    """`ercflow inspect` plans the fingerprint without the model: the layers resolve from the config alone."""
    from pipeline.inspect import planned_provenance

    for layers in ("last", "all", [0, -1]):
        raw = {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "layers": layers}
        extract(sample_manifest, build_encoder("t", raw), tmp_path / f"{layers}.h5")
        with FeatureStore(tmp_path / f"{layers}.h5") as s:
            planned = run_fingerprint(planned_provenance("t", raw), extract_inputs(sample_manifest, False, None))
            assert planned == s.attrs["fingerprint"]


@pytest.mark.parametrize("layers, match", [([3], "out of range"), ([-4], "out of range"), ([0, -3], "twice"),
                                           ([], "at least 1|last \\| all")])
def test_bad_layers_are_params_errors(tiny_bert, layers, match):
    with pytest.raises(ParamsError, match=match):
        build_encoder("t", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "layers": layers})


def test_audio_all_layer_store_and_the_older_layer_option(sample_manifest, sample_media, tmp_path):
    weights = save_tiny_speech_model(tmp_path / "wavlm", "wavlm")
    cfg = {"kind": "hf_audio", "weights": weights, "device": "cpu", "batch_size": 4}
    extract(sample_manifest, build_encoder("a", {**cfg, "layers": "all"}), tmp_path / "all.h5", sample_media)
    extract(sample_manifest, build_encoder("a", cfg), tmp_path / "last.h5", sample_media)
    x, last = check_layered_store(tmp_path / "all.h5", tmp_path / "last.h5", len(sample_manifest), 3, 32)
    # (this tiny WavLM has do_stable_layer_norm: its last_hidden_state is hidden_states[-1] after a LayerNorm)
    # `layer: k` keeps working: one layer, hidden_states[k], and no `layers` in its provenance (same fingerprint)
    extract(sample_manifest, build_encoder("a", {**cfg, "layer": 1}), tmp_path / "l1.h5", sample_media)
    with FeatureStore(tmp_path / "l1.h5") as s:
        np.testing.assert_allclose(s.pooled(), x[:, 1], atol=1e-5)
        assert "layers" not in s.attrs and "layers" not in s.attrs["config"] and s.attrs["config"]["layer"] == 1
    with pytest.raises(ParamsError, match="give `layers` only"):
        build_encoder("a", {**cfg, "layer": 1, "layers": "all"})


def test_video_all_layer_store(sample_manifest, sample_media, tmp_path):
    weights = save_tiny_timesformer(tmp_path / "tsf")
    cfg = {"kind": "hf_video", "weights": weights, "device": "cpu", "batch_size": 3}
    extract(sample_manifest, build_encoder("v", {**cfg, "layers": "all"}), tmp_path / "all.h5", sample_media)
    extract(sample_manifest, build_encoder("v", cfg), tmp_path / "last.h5", sample_media)
    x, last = check_layered_store(tmp_path / "all.h5", tmp_path / "last.h5", len(sample_manifest), 3, 32)
    # TimeSformer's last_hidden_state is its last hidden state after a final LayerNorm (per token, so also of
    # the pooled [CLS] token): `layers` keeps the hidden states as transformers reports them
    from transformers import TimesformerModel

    with torch.no_grad():
        normed = TimesformerModel.from_pretrained(weights).layernorm(torch.from_numpy(x[:, -1])).numpy()
    np.testing.assert_allclose(normed, last, atol=1e-4)


# --- target_mean ------------------------------------------------------------------------------------------

def dialogue(texts, speakers):
    df = pd.DataFrame({"utt_id": [f"x{i}" for i in range(len(texts))], "dataset": "t", "split": "train",
                       "dialogue_id": "d", "turn": range(len(texts)), "speaker": speakers, "text": texts,
                       "label": "a"})
    return Manifest(df, ManifestMeta(dataset="t", root=".", labels=["a"]))


TEXTS = ["i am so happy", "the cake", "happy happy cake", "sad"]
SPEAKERS = ["A", "B", "A", "B"]


def target_positions(enc, manifest, row):
    """(tokens, target token positions) of one row, as the encoder tokenizes it."""
    from pipeline.encoders.text import text_inputs

    c = enc.config
    pairs = text_inputs(manifest, np.array([row]), c.input_format, c.context_window, c.speaker_tokens,
                        sep=enc.tokenizer.sep_token, mask=enc.tokenizer.mask_token)
    encoded = enc.tokenize(pairs, [manifest.rows.at[row, "text"]])[0]
    mask = encoded.pop("target_mask")
    return enc.tokenizer.convert_ids_to_tokens(encoded["input_ids"]), [k for k, t in enumerate(mask) if t], encoded


@pytest.mark.parametrize("fmt", ["indi_context", "prompt"])
def test_target_mean_pools_exactly_the_target_tokens(tiny_bert, tmp_path, fmt):
    m = dialogue(TEXTS, SPEAKERS)
    enc = build_encoder("t", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "input_format": fmt,
                              "pooling": "target_mean", "layers": [1, 2]})
    toks, pos, encoded = target_positions(enc, m, 2)   # "happy happy cake" by A, after A's "i am so happy"
    if fmt == "indi_context":
        assert toks == ["[CLS]", "happy", "happy", "cake", "[SEP]", "i", "am", "so", "happy", "[SEP]"]
        assert pos == [1, 2, 3]
    else:
        assert toks == ["[CLS]", "<s1>", "i", "am", "so", "happy", "<s2>", "the", "cake", "<s1>", "happy", "happy",
                        "cake", "[SEP]", "now", "<s1>", "feels", "[MASK]", "[SEP]"]
        assert pos == [10, 11, 12]
    extract(m, enc, tmp_path / "s.h5")
    with torch.no_grad():
        out = enc.model(**{k: torch.tensor([v]) for k, v in encoded.items()}, output_hidden_states=True)
    want = np.stack([out.hidden_states[i][0, pos].mean(0).numpy() for i in (1, 2)])
    with FeatureStore(tmp_path / "s.h5") as s:
        assert s.pooled().shape == (4, 2, 32)
        np.testing.assert_allclose(s.pooled()[2], want, atol=1e-5)   # batched and padded with the other rows
    # the model still attends over the context: the same utterance alone pools to something else
    alone = build_encoder("t", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "pooling": "mean",
                                "layers": [1, 2]})
    extract(m, alone, tmp_path / "alone.h5")
    with FeatureStore(tmp_path / "alone.h5") as a, FeatureStore(tmp_path / "s.h5") as s:
        assert np.abs(a.pooled()[2] - s.pooled()[2]).max() > 1e-3


def test_target_mean_of_a_first_turn_and_of_a_long_utterance(tiny_bert):
    """No indi-context (a speaker's first turn): the target is the utterance between [CLS] and [SEP]; an
    utterance cut to max_length keeps all its tokens as the target and no context."""
    m = dialogue(TEXTS, SPEAKERS)
    enc = build_encoder("t", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "input_format": "indi_context",
                              "pooling": "target_mean"})
    toks, pos, _ = target_positions(enc, m, 0)
    assert toks == ["[CLS]", "i", "am", "so", "happy", "[SEP]"] and pos == [1, 2, 3, 4]
    short = build_encoder("t", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu",
                                "input_format": "indi_context", "pooling": "target_mean", "max_length": 4})
    toks, pos, _ = target_positions(short, m, 2)
    assert toks == ["[CLS]", "happy", "happy", "[SEP]"] and pos == [1, 2]


@pytest.mark.parametrize("fmt", ["utterance"])
def test_target_mean_only_with_a_context_format(tiny_bert, fmt):
    with pytest.raises(ParamsError, match="target_mean"):
        build_encoder("t", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu", "input_format": fmt,
                            "pooling": "target_mean"})


# --- LayerMix ---------------------------------------------------------------------------------------------

def test_layer_mix_weights_sum_to_one_and_learn():
    mix = LayerMix(4)
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    w = mix.weights().detach()
    assert float(w.sum()) == pytest.approx(1.0) and (w > 0).all()
    x = torch.randn(2, 3, 4, 5)
    out = mix(x)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out, (mix.weights()[:, None] * x).sum(-2))   # gamma starts at 1
    out.pow(2).sum().backward()
    assert mix.logits.grad.abs().min() > 0 and mix.gamma.grad.abs() > 0
    assert LayerMix(3, scale=False).gamma is None


def test_layer_mix_output_moves_with_a_layers_weight():
    torch.manual_seed(0)
    mix = LayerMix(3)
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([1.0, -1e9, 0.0]))   # layer 1: weight 0
        mix.gamma.fill_(1.5)
    w = mix.weights().detach()
    assert float(w[1]) == 0.0
    x = torch.randn(4, 3, 8)
    delta = torch.randn(4, 8)
    base = mix(x).detach()
    for layer in range(3):
        bumped = x.clone()
        bumped[:, layer] += delta
        torch.testing.assert_close(mix(bumped).detach() - base, 1.5 * w[layer] * delta, atol=1e-5, rtol=1e-5)
    bumped = x.clone()
    bumped[:, 1] += 1e6
    assert torch.equal(mix(bumped).detach(), base)                 # a zero-weight layer changes nothing


# --- heads on several-layer stores ------------------------------------------------------------------------

def layered_store(manifest, path, fn, n_layers, dim, valid=None):
    """A store whose pooled row is fn(row) of shape [n_layers, dim], with its `layers` attribute."""
    return store_from(manifest, path, fn, dim, valid=valid, layers=range(n_layers))


def layered_data(tmp_path, nan_row=None):
    """Text from a 3-layer store whose middle layer alone carries the label; audio and visual one-layer."""
    m = synthetic_manifest(n_dialogues=10, turns=6)
    rng = np.random.default_rng(0)
    label = dict(zip(m.utt_ids, m.label_index()))
    noise = {u: rng.normal(size=(3, 8)) for u in m.utt_ids}

    def text(r):
        x = noise[r["utt_id"]] * [[1.0], [0.2], [1.0]]
        x[1, label[r["utt_id"]]] += 2.0
        if r.name == nan_row:
            x[2, 0] = np.nan
        return x

    emb = {u: rng.normal(size=12) for u in m.utt_ids}
    stores = {"text": layered_store(m, tmp_path / "t.h5", text, 3, 8),
              "audio": store_from(m, tmp_path / "a.h5", lambda r: emb[r["utt_id"]][4:], 8,
                                  valid=np.arange(len(m)) % 4 != 1),
              "visual": store_from(m, tmp_path / "v.h5", lambda r: emb[r["utt_id"]][::2], 6)}
    return m, CachedDialogues(m, stores)


def test_cached_dialogues_standardise_each_layer(tmp_path):
    m, data = layered_data(tmp_path, nan_row=3)
    assert data.dim("text") == (3, 8) and data.dim("audio") == 8 and data.layers == {"text": [0, 1, 2]}
    x, ok = data.features["text"], data.valid["text"]
    assert x.shape == (len(m), 3, 8) and not ok[3] and not x[3].any()   # a NaN in one layer masks the row
    train = (m.rows["split"] == "train").to_numpy() & ok
    np.testing.assert_allclose(x[train].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x[train].std(0), 1, atol=1e-4)
    assert data.stats["text"][0].shape == (3, 8)
    b = data.batch(m.dialogues("train")[:3])
    assert b.features["text"].shape == (3, b.mask.shape[1], 3, 8) and b.features["audio"].ndim == 3


ALL_HEADS = {**HEADS, "late_fusion": {"hidden": 16, "dropout": 0.0}}


@pytest.mark.parametrize("name", list(ALL_HEADS))
def test_every_head_learns_the_layer_weights(tmp_path, name):
    m, data = layered_data(tmp_path)
    torch.manual_seed(0)
    head = build_head(name, {k: data.dim(k) for k in data.modalities}, 3, "categorical", ALL_HEADS[name])
    assert head.dims == {"text": 8, "audio": 8, "visual": 6} and list(head.mixers) == ["text"]
    head.prepare(data)                                   # TelME fits its teacher through the (untrained) mix
    batch = data.batch(m.dialogues("train")[:3])
    mixed = head.mix(batch)
    assert mixed.features["text"].shape == batch.features["text"].shape[:2] + (8,)
    assert head.mix(mixed) is mixed                      # mixed features pass through
    assert overfit(head, batch, steps=60, lr=1e-2) > 0.9
    no_grad = [n for n, p in head.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not no_grad, f"no gradient reaches {no_grad}"
    weights = head.layer_weights()
    assert list(weights) == ["text"] and len(weights["text"]) == 3 and sum(weights["text"]) == pytest.approx(1.0)
    assert weights["text"] != pytest.approx([1 / 3] * 3)


def built(name, data):
    torch.manual_seed(0)
    head = build_head(name, {k: data.dim(k) for k in data.modalities}, 3, "categorical", ALL_HEADS[name])
    head.prepare(data)
    return head


def test_telme_and_matav_losses_see_the_mixed_features(tmp_path):
    """TelME's students distil from the mixed teacher features; MaTAV's MEC trains the text layer mix."""
    m, data = layered_data(tmp_path)
    batch = data.batch(m.dialogues("train")[:3])
    telme = built("telme", data).eval()
    with torch.no_grad():
        before = telme.loss(batch, telme(batch))[1]["student_audio"]
        telme.mixers["text"].logits.copy_(torch.tensor([0.0, 5.0, 0.0]))
        assert telme.loss(batch, telme(batch))[1]["student_audio"] != pytest.approx(before)
    matav = built("matav", data)
    with torch.no_grad():
        out = matav(batch)
    loss, parts = matav.loss(batch, out)   # `out` carries no gradient: only MEC does
    loss.backward()
    assert "mec" in parts and matav.mixers["text"].logits.grad.abs().sum() > 0


def test_a_bundle_brings_back_the_layer_mix(tmp_path):
    from heads.bundle import load_trained_head, save_head

    m, data = layered_data(tmp_path)
    torch.manual_seed(0)
    head = build_head("dialoguetrm", {k: data.dim(k) for k in data.modalities}, 3, "categorical", HEADS["dialoguetrm"])
    batch = data.batch(m.dialogues("dev"))
    overfit(head, data.batch(m.dialogues("train")), steps=5, lr=1e-2)
    save_head(tmp_path / "h.safetensors", head.state_dict(), {
        "head": "dialoguetrm", "options": HEADS["dialoguetrm"], "task": "categorical", "modalities": data.modalities,
        "dims": dict(head.dims), "n_out": 3,
        "normalization": {k: {"mean": mu.tolist(), "std": sd.tolist()} for k, (mu, sd) in data.stats.items()}})
    loaded = load_trained_head(tmp_path / "h.safetensors")
    assert loaded.layer_weights() == head.layer_weights() and list(loaded.layer_weights()) == ["text"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), head.eval()(batch))
    # new data scaled with the bundle's own statistics, [layers, dim] for text
    again = CachedDialogues(m, {k: p for k, p in zip(data.modalities, (tmp_path / "t.h5", tmp_path / "a.h5",
                                                                       tmp_path / "v.h5"))},
                            stats={k: (np.asarray(mu), np.asarray(sd)) for k, (mu, sd) in data.stats.items()})
    np.testing.assert_allclose(again.features["text"], data.features["text"])


def test_a_one_layer_head_refuses_layered_features(tmp_path):
    m, data = layered_data(tmp_path)
    head = build_head("late_fusion", {"text": 8, "audio": 8, "visual": 6}, 3, "categorical", {})
    with pytest.raises(ValueError, match="text: features of 3 layers"):
        head(data.batch(m.dialogues("train")[:2]))


@pytest.mark.parametrize("name", list(ALL_HEADS))
def test_a_one_layer_store_builds_the_head_as_before(tmp_path, name):
    """No several-layer store: no mix, no new parameters or state, the batch passes `mix` untouched."""
    from conftest import three_modality_data

    m, data = three_modality_data(tmp_path)
    head = build_head(name, {k: data.dim(k) for k in data.modalities}, 3, "categorical", ALL_HEADS[name])
    batch = data.batch(m.dialogues("train")[:2])
    assert len(head.mixers) == 0 and head.layer_weights() == {} and head.mix(batch) is batch
    assert not [k for k in head.state_dict() if k.startswith("mixers")]


def test_the_train_stage_writes_the_layer_weights_and_predict_reproduces_it(tmp_path, monkeypatch, tiny_bert):
    """An all-layer text store through stage train: metrics.json and the bundle carry the learned weights
    (by hidden-state index), a plot is written, and `ercflow predict` (Model) gives the stage's test outputs."""
    import json

    import yaml

    from conftest import REPO
    from ercflow.model import load_model
    from stages import train

    words = "happy sad cake letter monday great furious love lost okay".split()
    m = synthetic_manifest(n_dialogues=14)
    rng = np.random.default_rng(0)
    m.rows["text"] = [f"{words[3 * 'abc'.index(y)]} {' '.join(rng.choice(words, 2))}" for y in m.rows["label"]]
    monkeypatch.chdir(tmp_path)
    m.save("data/manifest/syn")
    extract(m, build_encoder("text_minilm", {"kind": "hf_text", "weights": tiny_bert, "device": "cpu",
                                             "pooling": "mean", "layers": "all"}),
            tmp_path / "data/features/syn/text_minilm.h5")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(datasets=["syn"], train=["text_mlp"])
    params["data"]["syn"] = {"adapter": "generic", "manifest": "x.csv"}
    params["trainer"].update(seeds=[0, 1], epochs=6, device="cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    train.main(["--dataset", "syn", "--head", "text_mlp"])

    out = tmp_path / "results/syn/text_mlp"
    metrics = json.loads((out / "metrics.json").read_text())
    weights = metrics["layer_weights"]["text"]
    assert list(weights) == ["0", "1", "2"] and sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert weights != pytest.approx({"0": 1 / 3, "1": 1 / 3, "2": 1 / 3}, abs=1e-5)   # they moved
    assert set(metrics["layer_weights_per_seed"]) == {"0", "1"}
    assert metrics["layer_weights_per_seed"][str(metrics["kept_seed"])]["text"] == weights
    assert (out / "layer_weights.png").stat().st_size > 0
    from stages import report

    report.main([])
    assert "| syn | text_mlp | text | 0: " in (tmp_path / "reports/report.md").read_text()
    model = load_model(tmp_path / "models/syn/text_mlp.safetensors", device="cpu", work_dir=tmp_path / "work")
    assert model.meta["layer_weights"] == metrics["layer_weights"] and list(model.head.mixers) == ["text"]
    assert np.shape(model.meta["normalization"]["text"]["mean"]) == (3, 32)   # per layer
    stage = pd.read_csv(out / "predictions_test.csv")
    test = m.rows[m.rows["split"] == "test"][["utt_id", "dialogue_id", "turn", "speaker", "text"]]
    got = model.predict(test)
    assert got["utt_id"].tolist() == stage["utt_id"].tolist()
    probs = [f"p_{c}" for c in "abc"]
    np.testing.assert_allclose(got[probs].to_numpy(), stage[probs].to_numpy(), atol=1e-4)
    assert (got["prediction"] == stage["prediction"]).all()
