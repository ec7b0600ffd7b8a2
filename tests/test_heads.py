"""The three papers' heads: masks and losses against hand-computed values, NaN safety, overfitting."""
import numpy as np
import pytest
import torch

from heads import build_head
from heads.dialoguetrm import GATE, conv_context_mask, context_free_mask
from heads.matav import TAVAlignment, mec_term
from heads.telme import ASF, dist_loss, feature_kd_loss
from test_trainer import overfit, store_from, synthetic_manifest
from heads.data import CachedDialogues


def test_conv_context_mask_is_table1():
    m = conv_context_mask(8, 5)
    assert torch.nonzero(m[6]).flatten().tolist() == [1, 2, 3, 4, 5, 6]     # x7 -> {x2..x6} + itself
    assert torch.nonzero(m[2]).flatten().tolist() == [0, 1, 2]              # near the start: max(1, i-K)
    assert not m.triu(1).any()                                              # never the future
    assert torch.equal(context_free_mask(4), torch.eye(4, dtype=torch.bool))


def test_gate_hand_computed():
    g = GATE(2)
    with torch.no_grad():
        g.w_u.weight.copy_(torch.eye(2)); g.w_u.bias.zero_()
        g.w_a.weight.copy_(2 * torch.eye(2)); g.w_a.bias.zero_()
        g.w_z.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]])); g.w_z.bias.zero_()
    r_u, r_a = torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, 0.25]])
    h_ua, h_au = g(r_u, r_a)
    z = torch.sigmoid(torch.tensor([0.5, 0.25]))
    assert torch.allclose(h_ua, z * torch.tanh(torch.tensor([0.5, -1.0])))
    assert torch.allclose(h_au, (1 - z) * torch.tanh(torch.tensor([2.0, 0.5])))


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dist_loss_hand_computed():
    zs = np.array([[1.0, 2.0, 0.5, -1.0], [0.2, 0.1, 3.0, 0.0], [-0.5, 1.5, 1.0, 2.0]])
    zt = np.array([[2.0, 1.0, 0.0, -0.5], [0.0, 0.3, 2.5, 0.5], [1.0, 1.0, 0.2, 2.2]])
    tau = 2.0
    ys, yt = np_softmax(zs / tau), np_softmax(zt / tau)
    inter = np.mean([1 - np.corrcoef(ys[i], yt[i])[0, 1] for i in range(3)])
    intra = np.mean([1 - np.corrcoef(ys[:, j], yt[:, j])[0, 1] for j in range(4)])
    expected = tau ** 2 * (inter + intra)
    got = dist_loss(torch.tensor(zs), torch.tensor(zt), tau)
    assert float(got) == pytest.approx(expected, rel=1e-5)   # the 1e-8 guard in rho's denominator
    assert float(dist_loss(torch.tensor(zt), torch.tensor(zt), tau)) == pytest.approx(0.0, abs=1e-5)


def test_feature_kd_loss_hand_computed():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    sn = s / np.linalg.norm(s, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    tau = 0.5
    p, q = np_softmax(tn @ tn.T / tau), np_softmax(sn @ tn.T / tau)
    expected = np.mean(np.sum(p * np.log(p / q), axis=1))
    assert float(feature_kd_loss(torch.tensor(s), torch.tensor(t), tau)) == pytest.approx(expected, rel=1e-6)
    assert float(feature_kd_loss(torch.tensor(t), torch.tensor(t), tau)) == pytest.approx(0.0, abs=1e-7)


def test_mec_term_with_a_queue_hand_computed():
    rng = np.random.default_rng(1)
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k, queue = norm(rng.normal(size=(2, 3))), norm(rng.normal(size=(2, 3))), norm(rng.normal(size=(4, 3)))
    tau = 0.07
    expected = 0.0
    for i in range(2):
        logits = np.concatenate([[q[i] @ k[i]], queue @ q[i]]) / tau
        expected += -(logits[0] - np.log(np.exp(logits).sum())) / 2
    got = mec_term(torch.tensor(q), torch.tensor(k), torch.tensor(queue), tau)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_mec_queue_and_momentum():
    al = TAVAlignment({"text": 5, "audio": 4, "visual": 3}, d_proj=8, queue_size=6, momentum=0.5, temperature=0.1)
    before = al.queue("audio").clone()
    feats = {"text": torch.randn(4, 5), "audio": torch.randn(4, 4), "visual": torch.randn(4, 3)}
    with torch.no_grad():
        for p in al.heads.parameters():
            p.add_(1.0)   # the momentum copy lags behind
    loss = al.loss(feats, update=True)
    assert torch.isfinite(loss) and loss > 0
    assert int(al.queue_ptr) == 4 and torch.equal(al.queue("audio")[4:], before[4:])
    assert torch.allclose(al.queue("audio")[:4], al.momentum_heads["audio"](feats["audio"]))
    for p, q in zip(al.heads.parameters(), al.momentum_heads.parameters()):
        assert not torch.equal(p, q)   # moved halfway, not copied
    al.loss(feats, update=True)
    assert int(al.queue_ptr) == 2      # wrapped around the ring


def test_asf_lambda_is_capped():
    asf = ASF(6, 2, heads=2, theta=1e6, dropout=0.0)
    f_t = torch.randn(3, 6)
    z = asf(f_t, [torch.randn(3, 6), torch.randn(3, 6)])
    # theta huge: lambda = 1, so Z = F_T + H exactly
    s = torch.stack([torch.randn(3, 6)] * 2, 1)
    asf_small = ASF(6, 2, heads=2, theta=0.0, dropout=0.0)
    assert torch.allclose(asf_small(f_t, [s[:, 0], s[:, 1]]), f_t)    # theta 0: no shift
    assert z.shape == (3, 6)


HEADS = {
    "dialoguetrm": {"d_model": 32, "intra_layers": 1, "intra_heads": 2, "inter_layers": 1, "inter_heads": 2,
                    "window": 3, "dropout": 0.0},
    "telme": {"heads": 2, "dropout": 0.0},
    "matav": {"d_model": 32, "attention_layers": 1, "heads": 2, "queue_size": 16, "temperature": 0.1, "dropout": 0.0,
              "mec_symmetric": True},   # as written (eq. 5) g_v gets no gradient: see heads/matav.py
}


def three_modality_data(tmp_path, dims=False):
    m = synthetic_manifest(n_dialogues=10, turns=6, dims=dims)
    rng = np.random.default_rng(0)
    emb = {u: rng.normal(size=12) for u in m.utt_ids}
    valid = np.arange(len(m)) % 4 != 1
    stores = {"text": store_from(m, tmp_path / "t.h5", lambda r: emb[r["utt_id"]][:8], 8),
              "audio": store_from(m, tmp_path / "a.h5", lambda r: emb[r["utt_id"]][4:], 8, valid=valid),
              "visual": store_from(m, tmp_path / "v.h5", lambda r: emb[r["utt_id"]][::2], 6)}
    return m, CachedDialogues(m, stores)


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("task", ["categorical", "dimensional"])
def test_head_overfits_a_tiny_batch(tmp_path, name, task):
    torch.manual_seed(0)
    m, data = three_modality_data(tmp_path, dims=task == "dimensional")
    head = build_head(name, {k: data.dim(k) for k in data.modalities}, 3 if task == "categorical" else 2, task,
                      HEADS[name])
    head.prepare(data)
    batch = data.batch(m.dialogues("train")[:3])
    assert overfit(head, batch, steps=400, lr=1e-2) > 0.97
    trainable = [n for n, p in head.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in head.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert trainable and not no_grad, f"no gradient reaches {no_grad}"


@pytest.mark.parametrize("name", list(HEADS))
def test_padding_gives_no_nan(tmp_path, name):
    """Dialogues of very different lengths in one batch, masked modalities: outputs and grads stay finite."""
    m, data = three_modality_data(tmp_path)
    head = build_head(name, {k: data.dim(k) for k in data.modalities}, 3, "categorical", HEADS[name])
    dialogues = sorted(m.dialogues("train"), key=len)
    batch = data.batch([dialogues[0][:1], dialogues[-1]])
    batch.valid["audio"][:] = False
    out = head(batch)
    assert torch.isfinite(out).all()
    loss, _ = head.loss(batch, out)
    loss.backward()
    for n, p in head.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n


def test_dialoguetrm_padding_does_not_change_real_turns(tmp_path):
    m, data = three_modality_data(tmp_path)
    head = build_head("dialoguetrm", {k: data.dim(k) for k in data.modalities}, 3, "categorical",
                      HEADS["dialoguetrm"]).eval()
    short, long_ = sorted(m.dialogues("train"), key=len)[0], sorted(m.dialogues("train"), key=len)[-1]
    alone = head(data.batch([short]))
    padded = head(data.batch([short, long_]))[:1, :len(short)]
    assert torch.allclose(alone, padded, atol=1e-5)


@pytest.mark.parametrize("fusion", ["no_gate", "no_transformer", "additive", "concat", "max"])
def test_dialoguetrm_ablations_run(tmp_path, fusion):
    m, data = three_modality_data(tmp_path)
    head = build_head("dialoguetrm", {k: data.dim(k) for k in data.modalities}, 3, "categorical",
                      {**HEADS["dialoguetrm"], "fusion": fusion, "context": {"audio": "dependent"}})
    assert overfit(head, data.batch(m.dialogues("train")[:3]), steps=200, lr=3e-3) > 0.9


def test_telme_paper_defaults_and_explicit_options():
    head = build_head("telme", {"text": 6, "audio": 4}, 3, "categorical", {"paper_defaults": "iemocap", "theta": 0.5})
    assert (head.alpha, head.tau_r, head.asf.theta) == (0.1, 4.0, 0.5)   # Table 9 IEMOCAP, theta overridden
    with pytest.raises(ValueError, match="no paper_defaults 'avec'"):
        build_head("telme", {"text": 6, "audio": 4}, 3, "categorical", {"paper_defaults": "avec"})


@pytest.mark.parametrize("options", [{"response": False, "feature": False, "fusion": "concat"},
                                     {"paper_defaults": "iemocap"}, {"paper_defaults": "meld"}])
def test_telme_ablations_run(tmp_path, options):
    m, data = three_modality_data(tmp_path)
    head = build_head("telme", {k: data.dim(k) for k in data.modalities}, 3, "categorical", options)
    head.prepare(data)
    assert overfit(head, data.batch(m.dialogues("train")[:3]), steps=200, lr=3e-3) > 0.9


def test_matav_without_mamba_or_mec(tmp_path):
    m, data = three_modality_data(tmp_path)
    for options in ({"mamba": False}, {"mec_weight": 0.0}):
        head = build_head("matav", {k: data.dim(k) for k in data.modalities}, 3, "categorical",
                          {**HEADS["matav"], **options})
        assert (head.mamba is None) == ("mamba" in options)
        assert overfit(head, data.batch(m.dialogues("train")[:3]), steps=200, lr=3e-3) > 0.9


def test_mamba_stack_is_initialised_causal_and_deterministic():
    """CPU path (transformers' reference scan). GPU kernels vs this path: bench/mamba_agreement.py."""
    from heads.mamba import MambaStack

    torch.manual_seed(0)
    a = MambaStack(16, layers=2, state_size=4)
    b = MambaStack(16, layers=2, state_size=4)
    b.load_state_dict(a.state_dict())
    x, mask = torch.randn(2, 7, 16), torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    ya = a(x, mask)
    assert ya.abs().mean() > 0.1                      # not the zeros of an uninitialised block
    assert torch.equal(ya, b(x, mask))
    x2 = x.clone()
    x2[1, 4:] = 100.0                                 # padding after a real turn never reaches it
    assert torch.allclose(a(x2, mask)[1, :4], ya[1, :4], atol=1e-5)
    x3 = x.clone()
    x3[0, 5] += 1.0                                   # the future does not change the past
    assert torch.allclose(a(x3, mask)[0, :5], ya[0, :5], atol=1e-6)
