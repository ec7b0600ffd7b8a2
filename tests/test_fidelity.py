"""The papers as their code ran them (TelME arXiv:2401.12987, DialogueTRM arXiv:2010.07637, MaTAV
arXiv:2409.05243): presets with their sources, no silent change of a size, the teacher read raw, ASF as the public
module computes it (per utterance), feature KD's orientation, DialogueTRM's inputs and feed-forward width,
MaTAV's fusion block, masked modalities that take no part, and head options checked inside their dicts.

Each test here fails on the code before these settings existed (HEAD of the wave that added them)."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from ercflow.check import head_options
from ercflow.recipe import apply_recipe
from heads.data import CachedDialogues
from heads.registry import build_head, input_normalization
from heads.telme import ASF, PAPER_DEFAULTS, PAPER_SOURCES, feature_kd_loss
from pipeline.params import validate_params
from pipeline.vocab import ParamsError
from conftest import head_and_batch
from conftest import store_from, synthetic_manifest

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "params.yaml").read_text())
KEYS = ("alpha", "beta", "tau_response", "tau_feature", "theta", "dropout", "heads")


def problems_with(head: str, options: dict, raw: dict | None = None) -> list[str]:
    raw = copy.deepcopy(raw or BASE)
    raw["heads"][head]["options"] = {**raw["heads"][head]["options"], **options}
    return validate_params(raw, head_options())[1]


# --- TelME: presets -----------------------------------------------------------------------------------------

# the public code (yuntaeyang/TelME: {MELD,IEMOCAP}/student.py, *_kd.py, fusion.py) and Table 9 as printed
PUBLIC_CODE = {"meld": (1.0, 1.0, 4.0, 1.0, 0.1, 0.2, 3), "iemocap": (0.1, 1.0, 2.0, 1.0, 0.2, 0.2, 4)}
TABLE_9 = {"meld_table": (1.0, 1.0, 2.0, 1.0, 0.1, 0.1, 3), "iemocap_table": (0.1, 1.0, 4.0, 1.0, 0.01, 0.2, 4)}


@pytest.mark.parametrize("preset,row", [*PUBLIC_CODE.items(), *TABLE_9.items()])
def test_telme_presets_are_the_public_code_and_table_9(preset, row):
    assert tuple(PAPER_DEFAULTS[preset][k] for k in KEYS) == row
    assert set(PAPER_SOURCES[preset]) == set(KEYS) and all(PAPER_SOURCES[preset].values())   # every value sourced
    h = build_head("telme", {"text": 12, "audio": 6, "visual": 6}, 3, "categorical", {"paper_defaults": preset})
    alpha, beta, tau_r, tau_f, theta, dropout, heads = row
    assert (h.alpha, h.beta, h.tau_r, h.tau_f, h.asf.theta) == (alpha, beta, tau_r, tau_f, theta)
    assert h.asf.dropout.p == dropout and h.asf.attention.num_heads == heads
    assert h.asf.attention.dropout == 0.0   # the public module's attention has no dropout of its own


# --- TelME: no silent change of a size ----------------------------------------------------------------------

def test_a_1024_teacher_with_3_heads_is_refused_or_projected_never_2_heads():
    dims = {"text": 1024, "audio": 16, "visual": 16}
    for asf in ("code", "equations"):   # 2 x 1024 and 1024 are both indivisible by 3
        with pytest.raises(ParamsError, match=r"teacher_dim.*768"):
            build_head("telme", dims, 3, "categorical", {"paper_defaults": "meld", "asf": asf})
    h = build_head("telme", dims, 3, "categorical", {"paper_defaults": "meld", "teacher_dim": 768})
    assert h.asf.attention.num_heads == 3 and h.asf.attention.embed_dim == 2 * 768
    assert (h.teacher_proj.in_features, h.teacher_proj.out_features) == (1024, 768)
    assert h.students["audio"].classifier.in_features == 768 and h.classifier.in_features == 768
    # `ercflow check` refuses a projection width the heads do not divide, naming the option
    (line,) = problems_with("telme", {"teacher_dim": 1024})
    assert line.startswith("heads.telme.options") and "teacher_dim (1024)" in line and "heads (3)" in line
    assert problems_with("telme", {"teacher_dim": 768}) == []
    # asf: code splits students x teacher_dim: 100 with 8 heads fits two students (200), so check lets it pass
    # and the head with two students builds; with one student, or asf: equations (the width is 100), it does not
    options = {"paper_defaults": "meld", "heads": 8, "teacher_dim": 100}
    assert problems_with("telme", options) == []
    assert build_head("telme", dims, 3, "categorical", options).asf.attention.embed_dim == 200
    with pytest.raises(ParamsError, match=r"heads \(8\) does not divide .* 100"):
        build_head("telme", {"text": 1024, "audio": 16}, 3, "categorical", options)
    (line,) = problems_with("telme", {**options, "asf": "equations"})
    assert "teacher_dim (100)" in line and "heads (8)" in line


def test_the_teacher_projection_is_fitted_then_frozen(tmp_path):
    m = synthetic_manifest(n_dialogues=10, turns=6)
    rng = np.random.default_rng(0)
    emb = {u: rng.normal(size=10) for u in m.utt_ids}
    data = CachedDialogues(m, {"text": store_from(m, tmp_path / "t.h5", lambda r: emb[r["utt_id"]], 10),
                               "audio": store_from(m, tmp_path / "a.h5", lambda r: emb[r["utt_id"]][:6], 6)})
    head = build_head("telme", {"text": 10, "audio": 6}, 3, "categorical", {"heads": 2, "teacher_dim": 4})
    before = head.teacher_proj.weight.clone()
    head.prepare(data)
    assert not torch.equal(head.teacher_proj.weight, before)      # fitted (with the teacher's CE)
    batch = data.batch(m.dialogues("train")[:3])
    loss, _ = head.loss(batch, head(batch))
    loss.backward()
    assert all(p.grad is None for p in head.teacher_proj.parameters())   # and frozen while the head trains


# --- TelME: the teacher read raw, lambda from its raw norm -------------------------------------------------

def test_lambda_is_computed_from_the_raw_teacher_norm(tmp_path):
    m = synthetic_manifest(n_dialogues=6, turns=4)
    rng = np.random.default_rng(1)
    raw = {u: 10.0 + rng.normal(size=2) for u in m.utt_ids}   # far from zero mean: standardising would shrink it
    stores = {"text": store_from(m, tmp_path / "t.h5", lambda r: raw[r["utt_id"]], 2),
              "audio": store_from(m, tmp_path / "a.h5", lambda r: raw[r["utt_id"]] * 0.5, 2)}
    normalize = input_normalization("telme", ["text", "audio"], {})
    assert normalize == {"text": False, "audio": True}   # the teacher raw, as the public code; students standardised
    assert input_normalization("telme", ["text", "audio"], {"normalize": {"text": "standard"}})["text"]
    assert input_normalization("telme", ["text", "audio"], {"students": "stores"}) == {"text": False, "audio": False}
    data = CachedDialogues(m, stores, normalize=normalize)
    assert "text" not in data.stats
    head = build_head("telme", {"text": 2, "audio": 2}, 3, "categorical",
                      {"heads": 1, "theta": 0.05, "dropout": 0.0, "asf": "equations"}).eval()
    batch = data.batch(m.dialogues("train")[:2])
    f_t = head.teacher_features(batch.features["text"][batch.mask])
    rows = batch.rows[batch.mask].numpy()
    expected_ft = np.stack([raw[m.rows.iloc[i]["utt_id"]] for i in rows]).astype(np.float32)
    assert np.allclose(f_t.numpy(), expected_ft)
    # eq. 19 on a hand-built shift: W2 maps F_att to a fixed H = (0.6, 0.8) (||H|| = 1), W1 gates it fully
    asf = head.asf
    with torch.no_grad():
        asf.w1.weight.zero_(); asf.w1.bias.fill_(1.0)
        asf.w2.weight.zero_(); asf.w2.bias.copy_(torch.tensor([0.6, 0.8]))
        h, lam = asf.shift(f_t, torch.ones(len(f_t), 2))
    assert torch.allclose(h, torch.tensor([0.6, 0.8]).expand_as(h))
    want = np.minimum(0.05 * np.linalg.norm(expected_ft, axis=1) / (1.0 + 1e-6), 1.0)
    assert np.allclose(lam[:, 0].numpy(), want, rtol=1e-6)
    assert (want > 0.5).all()   # from the raw norm (about 14): standardised, ||F_T|| would be about 1.4


# --- TelME: ASF as the public module computes it, per utterance ---------------------------------------------

def np_layer_norm(x, w, b, eps=1e-5):
    return (x - x.mean()) / np.sqrt(x.var() + eps) * w + b


def test_asf_with_the_norms_hand_computed():
    """`asf: code` on 2-d vectors, two students, one head, every weight set by hand."""
    asf = ASF(2, 2, heads=1, theta=0.5, dropout=0.0, structure="code").eval()
    rng = np.random.default_rng(0)
    w_in, b_in = rng.normal(size=(12, 4)), rng.normal(size=12)
    w_o, b_o = rng.normal(size=(4, 4)), rng.normal(size=4)
    ln_s = (np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.0, 0.1, -0.2, 0.3]))
    w1, b1 = rng.normal(size=(2, 6)), rng.normal(size=2)
    w2, b2 = rng.normal(size=(2, 4)), rng.normal(size=2)
    ln = (np.array([1.5, 0.5]), np.array([0.2, -0.1]))
    with torch.no_grad():
        for p, v in ((asf.attention.in_proj_weight, w_in), (asf.attention.in_proj_bias, b_in),
                     (asf.attention.out_proj.weight, w_o), (asf.attention.out_proj.bias, b_o),
                     (asf.students_norm.weight, ln_s[0]), (asf.students_norm.bias, ln_s[1]),
                     (asf.w1.weight, w1), (asf.w1.bias, b1), (asf.w2.weight, w2), (asf.w2.bias, b2),
                     (asf.norm.weight, ln[0]), (asf.norm.bias, ln[1])):
            p.copy_(torch.tensor(v, dtype=torch.float32))
    f_t, s_a, s_v = np.array([1.0, -2.0]), np.array([0.5, 1.0]), np.array([-1.0, 0.25])
    x = np.concatenate([s_a, s_v])
    # one token: its attention weight on itself is 1, so MHA(x) = W_o (W_v x + b_v) + b_o
    att = w_o @ (w_in[8:] @ x + b_in[8:]) + b_o
    f_att = np_layer_norm(att + x, *ln_s)                            # residual, AV_LayerNorm
    g = np.maximum(w1 @ np.concatenate([f_t, f_att]) + b1, 0)        # eq. 16
    h = g * (w2 @ f_att + b2)                                        # eq. 17
    lam = min(np.linalg.norm(f_t) / (np.linalg.norm(h) + 1e-6) * 0.5, 1.0)   # eq. 19
    expected = np_layer_norm(f_t + lam * h, *ln)                     # LayerNorm(F_T + lambda H)
    t = lambda v: torch.tensor(v[None], dtype=torch.float32)   # noqa: E731
    got = asf(t(f_t), [t(s_a), t(s_v)])
    assert np.allclose(got[0].detach().numpy(), expected, atol=1e-5)
    assert abs(lam - 1.0) > 0.05   # the cap does not hide the norm ratio here


def public_asf(asf: ASF, f_t: torch.Tensor, students: list[torch.Tensor]) -> torch.Tensor:
    """The public module's forward (yuntaeyang/TelME MELD/model.py, ASF.forward) with `asf`'s weights: its
    MultiheadAttention gets the 2-D [batch, features] tensor, i.e. one unbatched sequence of the batch's rows."""
    nv = torch.cat(students, dim=-1)
    new_nv = asf.attention(nv, nv, nv, need_weights=False)[0] + nv
    av = asf.dropout(asf.students_norm(new_nv))
    h = F.relu(asf.w1(torch.cat([f_t, av], dim=-1))) * asf.w2(av)
    hm = h.norm(dim=-1)
    hm = torch.where(hm == 0, torch.ones_like(hm), hm)
    lam = torch.minimum(f_t.norm(dim=-1) / (hm + 1e-6) * asf.theta, torch.ones_like(hm))[:, None]
    return asf.dropout(asf.norm(lam * h + f_t))


def test_an_utterance_s_asf_output_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    asf = ASF(8, 2, heads=4, theta=0.2, dropout=0.0, structure="code").eval()
    f_t, a, v = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    others = torch.randn(4, 8) * 3
    with torch.no_grad():
        out = asf(f_t, [a, v])
        again = asf(torch.cat([f_t[:1], others]), [torch.cat([a[:1], -others]), torch.cat([v[:1], others.flip(0)])])
        assert torch.allclose(out[0], again[0], atol=1e-6)
        # alone in its batch it is exactly the public module's output ...
        assert torch.allclose(out[0], public_asf(asf, f_t[:1], [a[:1], v[:1]])[0], atol=1e-6)
        # ... which, fed the whole batch, attends across it: the leak this module does not have
        leaky = public_asf(asf, f_t, [a, v])[0]
        assert (leaky - out[0]).abs().max() > 1e-3


# --- TelME: feature KD's orientation ------------------------------------------------------------------------

def test_feature_kd_default_orientation_is_the_public_code_s():
    """Feature_Loss of the public code: x = T S^T (teacher rows), KL(softmax(T T^T / t) || softmax(x / t))."""
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    sn, tn = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (s, t))
    tau = 0.5

    def kl(m_prime):
        target, x = tn @ tn.T / tau, m_prime / tau
        p = np.exp(target - target.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
        log_q = x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
        return float(np.mean(np.sum(p * (np.log(p) - log_q), axis=1)))

    got = float(feature_kd_loss(torch.tensor(s), torch.tensor(t), tau))
    assert got == pytest.approx(kl(tn @ sn.T), rel=1e-6)
    assert float(feature_kd_loss(torch.tensor(s), torch.tensor(t), tau, "student")) == pytest.approx(kl(sn @ tn.T),
                                                                                                     rel=1e-6)
    assert abs(kl(tn @ sn.T) - kl(sn @ tn.T)) > 1e-3   # the two orientations differ on this input
    assert build_head("telme", {"text": 6, "audio": 4}, 3, "categorical", {"heads": 2}).kd_rows == "teacher"


# --- DialogueTRM: MELD inputs, feed-forward width ------------------------------------------------------------

def test_the_meld_dialoguetrm_recipe_reads_no_visual_store():
    raw = apply_recipe("meld-dialoguetrm", copy.deepcopy(BASE))
    params, problems = validate_params(raw, head_options())
    assert problems == []
    visual = {name for name, enc in raw["encoders"].items() if params.store_modality(name) == "visual"}
    assert not visual & set(params.extract)   # no visual encoder runs
    for head in params.train:
        assert "visual" not in params.head(head).modalities
        stores = params.feature_stores("meld", head)
        assert "visual" not in stores and not any(Path(p).stem in visual for p in stores.values())


def test_dialoguetrm_feedforward_width_in_the_built_module():
    dims = {"text": 8, "audio": 8}
    paper = {"d_model": 768, "intra_layers": 1, "intra_heads": 12, "inter_layers": 1, "inter_heads": 8}
    h = build_head("dialoguetrm", dims, 3, "categorical", paper)
    widths = {layer.linear1.out_features for enc in [*[t.encoder for t in h.intra.values()], h.mgif.encoder]
              for layer in enc.layers}
    assert widths == {2048}   # PyTorch's default, the paper's "PyTorch defaults" (§5.2), not 4 x 768
    h = build_head("dialoguetrm", dims, 3, "categorical", {**paper, "d_model": 64, "intra_heads": 4,
                                                           "inter_heads": 4, "feedforward": 100})
    assert {layer.linear1.out_features for layer in h.intra["text"].encoder.layers} == {100}
    assert {layer.linear1.out_features for layer in h.mgif.encoder.layers} == {100}
    h = build_head("dialoguetrm", dims, 3, "categorical", {**paper, "d_model": 64, "intra_heads": 4, "inter_heads": 4})
    assert h.intra["text"].encoder.layers[0].linear1.out_features == 171   # 2048 / 768 of d_model
    assert "heads.dialoguetrm.options.feedforward" in problems_with("dialoguetrm", {"feedforward": 0})[0]


# --- MaTAV: the fusion block ---------------------------------------------------------------------------------

def test_matav_fusion_block_attention_is_eq_6_7_literally(tmp_path):
    dims = {"text": 8, "audio": 8, "visual": 6}
    opts = {"d_model": 16, "attention_layers": 2, "heads": 2, "queue_size": 8, "dropout": 0.0}
    default = build_head("matav", dims, 3, "categorical", opts)
    assert isinstance(default.cross_attention, nn.TransformerEncoder)   # the default: full layers
    h = build_head("matav", dims, 3, "categorical", {**opts, "fusion_block": "attention"}).eval()
    kinds = {type(m) for m in h.cross_attention.modules()} - {type(h.cross_attention), nn.ModuleList}
    assert kinds <= {nn.MultiheadAttention, nn.modules.linear.NonDynamicallyQuantizableLinear}   # no norm, no FFN
    x = torch.randn(3, 3, 16)
    with torch.no_grad():
        want = x
        for att in h.cross_attention.layers:   # x <- softmax(QK^T / sqrt(d_k)) V, then W_O; nothing else
            q, k, v = (F.linear(want, w, b) for w, b in zip(att.in_proj_weight.chunk(3), att.in_proj_bias.chunk(3)))
            split = lambda z: z.reshape(3, 3, 2, 8).transpose(1, 2)   # noqa: E731
            a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / 8 ** 0.5, -1) @ split(v)
            want = att.out_proj(a.transpose(1, 2).reshape(3, 3, 16))
        assert torch.allclose(h.cross_attention(x), want, atol=1e-5)
    head, batch = head_and_batch(tmp_path, "matav", fusion_block="attention")
    loss, _ = head.loss(batch, head(batch))
    assert torch.isfinite(loss)
    assert "heads.matav.options.fusion_block" in problems_with("matav", {"fusion_block": "attn"})[0]


# --- every head: a masked modality takes no part, not even through its parameters ---------------------------

AUDIO_PARAMETERS = {"dialoguetrm": lambda h: h.intra["audio"], "matav": lambda h: h.align.heads["audio"],
                    "telme": lambda h: h.students["audio"], "late_fusion": lambda h: h.encoders["audio"]}


@pytest.mark.parametrize("name,options", [("dialoguetrm", {}), ("matav", {}), ("matav", {"fusion_block": "attention"}),
                                          ("telme", {}), ("telme", {"asf": "equations"}), ("late_fusion", {})])
def test_a_masked_modality_s_parameters_change_no_output(tmp_path, name, options):
    """Perturbing the PARAMETERS that process audio leaves the prediction of every utterance whose audio is
    masked as it was (TelME before this: its audio student's biases reached ASF). MaTAV is checked without its
    Mamba on half-masked audio (the dialogue context rightly carries the other turns' audio), and with it on a
    batch whose audio is masked everywhere."""
    for extra, share in (({"mamba": False} if name == "matav" else {}, 0.5), ({}, 1.0)):
        head, batch = head_and_batch(tmp_path, name, **options, **extra)
        masked = batch.mask & torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(0)).lt(share)
        batch.valid["audio"] &= ~masked
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            out = head(batch)
            for p in AUDIO_PARAMETERS[name](head).parameters():
                p.add_(torch.randn(p.shape, generator=g))
            moved = head(batch)
        assert masked.any() and torch.equal(moved[masked], out[masked])
        if share < 1:   # the perturbation does reach utterances with audio (the test can fail)
            assert (moved - out)[batch.valid["audio"] & batch.mask].abs().max() > 1e-4


# --- ercflow check: values inside dict-valued options (issue: nothing silent) --------------------------------

@pytest.mark.parametrize("head,options,path,says", [
    ("dialoguetrm", {"context": {"text": "depend"}}, "heads.dialoguetrm.options.context.text", "'depend' is not one of"),
    ("dialoguetrm", {"context": {"txt": "free"}}, "heads.dialoguetrm.options.context.txt", "unknown key 'txt'"),
    ("telme", {"normalize": {"text": "zscore"}}, "heads.telme.options.normalize.text", "'zscore' is not one of"),
    ("matav", {"normalize": {"vision": "none"}}, "heads.matav.options.normalize.vision", "unknown key 'vision'"),
])
def test_check_refuses_bad_values_inside_dict_options(head, options, path, says):
    (line,) = problems_with(head, options)
    assert line.startswith(path + ":") and says in line
