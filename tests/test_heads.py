"""The three papers' heads: masks and losses against hand-computed values, NaN safety, overfitting."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from heads.registry import build_head
from heads.dialoguetrm import GATE, MGIF, Discriminator, conv_context_mask, context_free_mask
from heads.matav import TAVAlignment, mec_term
from heads.telme import ASF, dist_loss, feature_kd_loss
from conftest import overfit, train_steps
from heads.data import CachedDialogues
from conftest import head_and_batch, HEADS, three_modality_data


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
    p = np_softmax(tn @ tn.T / tau)
    for rows, m_prime in (("teacher", tn @ sn.T), ("student", sn @ tn.T)):   # M' = T S^T (code) | S T^T
        q = np_softmax(m_prime / tau)
        expected = np.mean(np.sum(p * np.log(p / q), axis=1))
        assert float(feature_kd_loss(torch.tensor(s), torch.tensor(t), tau, rows)) == pytest.approx(expected, rel=1e-6)
        assert float(feature_kd_loss(torch.tensor(t), torch.tensor(t), tau, rows)) == pytest.approx(0.0, abs=1e-7)
    # the default is the public code's orientation, and the two differ on this input (the test can fail)
    assert float(feature_kd_loss(torch.tensor(s), torch.tensor(t), tau)) == \
        float(feature_kd_loss(torch.tensor(s), torch.tensor(t), tau, "teacher"))
    assert abs(float(feature_kd_loss(torch.tensor(s), torch.tensor(t), tau, "student")) -
               float(feature_kd_loss(torch.tensor(s), torch.tensor(t), tau, "teacher"))) > 1e-3


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
    valid = {m: torch.ones(4, dtype=torch.bool) for m in feats}
    with torch.no_grad():
        for p in al.heads.parameters():
            p.add_(1.0)   # the momentum copy lags behind
    theta = [p.detach().clone() for p in al.heads.parameters()]
    theta_k = [q.detach().clone() for q in al.momentum_heads.parameters()]
    loss = al.loss(feats, valid, update=True)
    assert torch.isfinite(loss) and loss > 0
    for p, q0, q in zip(theta, theta_k, al.momentum_heads.parameters()):
        assert torch.allclose(q, 0.5 * q0 + 0.5 * p)      # exactly m theta_k + (1 - m) theta_q
    assert int(al.queue_ptr_audio) == 4 and torch.equal(al.queue("audio")[4:], before[4:])
    assert torch.allclose(al.queue("audio")[:4], al.momentum_heads["audio"](feats["audio"]))
    al.loss(feats, valid, update=True)
    assert int(al.queue_ptr_audio) == 2      # wrapped around the ring


def test_mec_queue_takes_a_batch_larger_than_the_queue():
    al = TAVAlignment({"text": 5, "audio": 4}, d_proj=8, queue_size=6, momentum=0.9, temperature=0.1)
    al.enqueue("audio", F.normalize(torch.randn(2, 8), dim=-1))          # pointer at 2
    keys = F.normalize(torch.randn(10, 8), dim=-1)
    al.enqueue("audio", keys)                                            # 10 keys into a queue of 6
    newest = keys[-6:]
    assert torch.equal(al.queue("audio")[[2, 3, 4, 5, 0, 1]], newest) and int(al.queue_ptr_audio) == 2
    feats = {"text": torch.randn(10, 5), "audio": torch.randn(10, 4)}
    loss = al.loss(feats, {m: torch.ones(10, dtype=torch.bool) for m in feats}, update=True)
    loss.backward()
    assert torch.isfinite(loss)


def test_mec_drops_only_the_pairs_of_a_masked_modality():
    torch.manual_seed(0)
    al = TAVAlignment({"text": 5, "audio": 4, "visual": 3}, d_proj=8, queue_size=6, momentum=0.9, temperature=0.1)
    feats = {"text": torch.randn(5, 5), "audio": torch.randn(5, 4), "visual": torch.randn(5, 3)}
    valid = {m: torch.ones(5, dtype=torch.bool) for m in feats}
    valid["audio"][[1, 3]] = False
    got = al.loss(feats, valid, update=False)
    q = {m: al.heads[m](x) for m, x in feats.items()}
    k = {m: al.momentum_heads[m](x) for m, x in feats.items()}
    a = valid["audio"]
    expected = (mec_term(q["text"][a], k["audio"][a], al.queue("audio"), 0.1)       # (T, A'): 3 utterances
                + mec_term(q["audio"][a], k["visual"][a], al.queue("visual"), 0.1)  # (A, V'): 3 utterances
                + mec_term(q["text"], k["visual"], al.queue("visual"), 0.1))        # (T, V'): all 5
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def matav_and_batch(tmp_path, **options):
    m, data = three_modality_data(tmp_path)
    torch.manual_seed(0)
    head = build_head("matav", {k: data.dim(k) for k in data.modalities}, 3, "categorical",
                      {**HEADS["matav"], **options})
    return head, data, data.batch(m.dialogues("train")[:4])


def test_matav_mec_weight_changes_the_trained_outputs(tmp_path):
    """MEC trains the projections the cross-attention reads: with and without it, training ends elsewhere."""
    outs = []
    for weight in (0.0, 0.3):
        head, _, batch = matav_and_batch(tmp_path / str(weight), mec_weight=weight)
        train_steps(head, batch, 30)
        with torch.no_grad():
            outs.append(head(batch))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_matav_mec_gradient_reaches_what_the_classifier_reads(tmp_path):
    head, _, batch = matav_and_batch(tmp_path)
    feats, valid = head.real_turns(batch)
    head.align.loss(feats, valid, update=False).backward()
    reached = {n for n, p in head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"align.heads.text.linear.weight", "align.heads.audio.linear.weight"} <= reached
    with torch.no_grad():
        head.eval()
        before = head(batch)
        head.align.heads["audio"].linear.weight.add_(0.5)   # the parameters MEC trains feed the prediction
        assert (head(batch) - before).abs().max() > 1e-4


def test_matav_trains_on_a_batch_larger_than_its_queue(tmp_path):
    head, _, batch = matav_and_batch(tmp_path, queue_size=4)
    assert int(batch.mask.sum()) > 4
    loss, parts = head.loss(batch, head(batch))
    loss.backward()
    assert torch.isfinite(loss) and "mec" in parts


def perturbed(batch, modality, where, scale=5.0):
    b = copy.deepcopy(batch)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(b.features[modality].shape, generator=g) * scale
    b.features[modality] = torch.where(where[..., None], b.features[modality] + noise, b.features[modality])
    return b


@pytest.mark.parametrize("name", ["dialoguetrm", "matav", "telme", "late_fusion"])
def test_a_masked_modality_changes_no_output(tmp_path, name):
    head, batch = head_and_batch(tmp_path, name)
    masked = batch.mask & torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(0)).lt(0.5)
    batch.valid["audio"] &= ~masked
    with torch.no_grad():
        out = head(batch)
        assert torch.equal(head(perturbed(batch, "audio", masked)), out)
        # the same perturbation of valid audio does change the output (the test can fail)
        assert (head(perturbed(batch, "audio", batch.valid["audio"])) - out).abs().max() > 1e-4


# the stricter check, perturbing the PARAMETERS that process a masked modality: tests/test_fidelity.py


def grad_names(head, batch):
    head.zero_grad()
    loss, _ = head.loss(batch, head(batch))
    loss.backward()
    return {n.split(".")[0] + "." + n.split(".")[1] for n, p in head.named_parameters()
            if p.grad is not None and p.grad.abs().sum() > 0}


def output_change(head, batch, module: nn.Module) -> float:
    with torch.no_grad():
        before = head(batch)
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        return float((head(batch) - before).abs().max())


def test_dialoguetrm_gate_and_transformer_ablations(tmp_path):
    head, batch = head_and_batch(tmp_path, "dialoguetrm")
    assert output_change(head, batch, head.mgif.gates) > 1e-4          # GATE shapes the full model's output
    head, batch = head_and_batch(tmp_path, "dialoguetrm")
    assert output_change(head, batch, head.mgif.encoder) > 1e-4
    head, batch = head_and_batch(tmp_path, "dialoguetrm", fusion="no_gate")
    assert len(head.mgif.gates) == 0 and output_change(head, batch, head.mgif.encoder) > 1e-4
    head, batch = head_and_batch(tmp_path, "dialoguetrm", fusion="no_transformer")
    assert not hasattr(head.mgif, "encoder") and output_change(head, batch, head.mgif.gates) > 1e-4
    for fusion in ("additive", "concat", "max"):
        head, batch = head_and_batch(tmp_path, "dialoguetrm", fusion=fusion)
        assert not hasattr(head, "mgif")


@pytest.mark.parametrize("context,reaches_next_turn", [("free", False), ("dependent", True)])
def test_dialoguetrm_context_masks_decide_what_a_turn_sees(tmp_path, context, reaches_next_turn):
    """Eq. 3 vs eq. 6: audio of turn 0 reaches turn 1's prediction only when audio is context-dependent."""
    head, batch = head_and_batch(tmp_path, "dialoguetrm", context={"audio": context})
    batch.valid["audio"][:] = batch.mask
    first = torch.zeros_like(batch.mask)
    first[:, 0] = True
    with torch.no_grad():
        delta = (head(perturbed(batch, "audio", first)) - head(batch)).abs()
    assert delta[:, 0].max() > 1e-4
    assert (delta[:, 1].max() > 1e-4) == reaches_next_turn


@pytest.mark.parametrize("mamba", [False, True])
def test_matav_without_mamba_has_no_dialogue_context(tmp_path, mamba):
    head, batch = head_and_batch(tmp_path, "matav", mamba=mamba)
    first = torch.zeros_like(batch.mask)
    first[:, 0] = True
    with torch.no_grad():
        delta = (head(perturbed(batch, "text", first)) - head(batch)).abs()
    assert delta[:, 0].max() > 1e-4
    assert (delta[:, 1:].max() > 1e-4) == mamba
    assert (head.mamba is None) != mamba


@pytest.mark.parametrize("response,feature", [(True, True), (False, True), (True, False), (False, False)])
def test_telme_response_and_feature_terms(tmp_path, response, feature):
    """Each KD term is in the student's loss exactly when it is switched on (Table 3)."""
    head, batch = head_and_batch(tmp_path, "telme", response=response, feature=feature)
    batch.extra["text_logits"] = torch.randn(*batch.mask.shape, 3, generator=torch.Generator().manual_seed(2))
    base = head.loss(batch, head(batch))[1]["student_audio"]
    logits = copy.deepcopy(batch)
    logits.extra["text_logits"] = logits.extra["text_logits"] * -3.0
    feats = perturbed(batch, "text", batch.mask)
    assert (head.loss(logits, head(logits))[1]["student_audio"] != pytest.approx(base)) == response
    assert (head.loss(feats, head(feats))[1]["student_audio"] != pytest.approx(base)) == feature


def test_telme_concat_fusion_has_no_asf(tmp_path):
    head, batch = head_and_batch(tmp_path, "telme")
    assert output_change(head, batch, head.asf) > 1e-4
    head, batch = head_and_batch(tmp_path, "telme", fusion="concat")
    assert not hasattr(head, "asf")


def test_asf_lambda_is_capped():
    asf = ASF(6, 2, heads=2, theta=1e6, dropout=0.0, structure="equations")
    f_t = torch.randn(3, 6)
    z = asf(f_t, [torch.randn(3, 6), torch.randn(3, 6)])
    # theta huge: lambda = 1, so Z = F_T + H exactly
    s = torch.stack([torch.randn(3, 6)] * 2, 1)
    asf_small = ASF(6, 2, heads=2, theta=0.0, dropout=0.0, structure="equations")
    assert torch.allclose(asf_small(f_t, [s[:, 0], s[:, 1]]), f_t)    # theta 0: no shift
    assert z.shape == (3, 6)


def test_asf_hand_computed():
    """Eq. 16-19 as printed (`structure="equations"`) on 2-d vectors with one attention head, every weight set
    by hand. The public code's structure (norms, one concatenated token): tests/test_fidelity.py."""
    asf = ASF(2, 2, heads=1, theta=0.5, dropout=0.0, structure="equations").eval()
    w_qkv = torch.tensor([[1.0, 0], [0, 1], [0.5, 0], [0, -1], [1, 1], [0, 2]])
    w_o, w1, w2 = torch.tensor([[1.0, 0.5], [0, 1]]), torch.arange(12.0).reshape(2, 6) / 10 - 0.3, \
        torch.tensor([[1.0, 0, -1, 0.5], [0.2, 0.3, 0, 1]])
    with torch.no_grad():
        asf.attention.in_proj_weight.copy_(w_qkv); asf.attention.in_proj_bias.zero_()
        asf.attention.out_proj.weight.copy_(w_o); asf.attention.out_proj.bias.zero_()
        asf.w1.weight.copy_(w1); asf.w1.bias.fill_(0.1)
        asf.w2.weight.copy_(w2); asf.w2.bias.fill_(-0.2)
    f_t, s_a, s_v = np.array([3.0, -1.0]), np.array([0.5, 1.0]), np.array([-1.0, 2.0])
    S = np.stack([s_a, s_v])
    q, k, v = S @ w_qkv[:2].numpy().T, S @ w_qkv[2:4].numpy().T, S @ w_qkv[4:].numpy().T
    f_att = (np_softmax(q @ k.T / np.sqrt(2)) @ v @ w_o.numpy().T).reshape(-1)        # <F_a', F_v'>
    g = np.maximum(w1.numpy() @ np.concatenate([f_t, f_att]) + 0.1, 0)                # eq. 16
    h = g * (w2.numpy() @ f_att - 0.2)                                                # eq. 17
    lam = min(np.linalg.norm(f_t) / np.linalg.norm(h) * 0.5, 1.0)                     # eq. 19
    assert 0 < lam < 1                                                                # not the cap
    got = asf(torch.tensor([f_t], dtype=torch.float32), [torch.tensor([s_a], dtype=torch.float32),
                                                         torch.tensor([s_v], dtype=torch.float32)])
    assert np.allclose(got[0].detach().numpy(), f_t + lam * h, atol=1e-5)            # eq. 18
    asf.theta = 100.0                                                                 # lambda capped at 1
    got = asf(torch.tensor([f_t], dtype=torch.float32), [torch.tensor([s_a], dtype=torch.float32),
                                                         torch.tensor([s_v], dtype=torch.float32)])
    assert np.allclose(got[0].detach().numpy(), f_t + h, atol=1e-5)


def test_mgif_tokens_and_cls_output():
    """Eq. 13-16: the six gated vectors in pair order behind e_CLS; o is the Transformer's output at e_CLS."""
    torch.manual_seed(0)
    mgif = MGIF(["text", "audio", "visual"], 8, layers=1, heads=2, dropout=0.0).eval()
    reps = {m: torch.randn(3, 8) for m in ("text", "audio", "visual")}
    valid = {m: torch.ones(3, dtype=torch.bool) for m in reps}
    toks = []
    for a, b in (("text", "audio"), ("text", "visual"), ("audio", "visual")):
        toks.extend(mgif.gates[f"{a}_{b}"](reps[a], reps[b]))
    expected = mgif.encoder(torch.stack([mgif.cls.expand(3, 8)] + toks, dim=1))[:, 0]
    assert torch.allclose(mgif(reps, valid), expected, atol=1e-6)
    # a masked visual drops its tokens: the result equals MGIF over text/audio tokens + the ungated passes
    valid["visual"][1] = False
    out = mgif(reps, valid)
    assert torch.allclose(out[[0, 2]], expected[[0, 2]], atol=1e-6) and not torch.allclose(out[1], expected[1])


def test_discriminator_hand_computed():
    d = Discriminator(3, 2, 2)
    with torch.no_grad():
        d.hidden.weight.copy_(torch.tensor([[1.0, 0, -1], [0.5, 0.5, 0]])); d.hidden.bias.zero_()
        d.out.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0]])); d.out.bias.fill_(0.5)
    o = torch.tensor([[1.0, 2.0, 3.0]])
    h = torch.tanh(torch.tensor([-2.0, 1.5]))                                   # eq. 17: tanh(W^O o)
    assert torch.allclose(d(o)[0], torch.tensor([h[0] + 2 * h[1] + 0.5, -h[0] + 0.5]))   # eq. 18: W^C h


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
    head = build_head("telme", {"text": 8, "audio": 4}, 3, "categorical", {"paper_defaults": "iemocap", "theta": 0.5})
    assert (head.alpha, head.tau_r, head.asf.theta) == (0.1, 2.0, 0.5)   # the public code's IEMOCAP, theta overridden
    with pytest.raises(ValueError, match="no paper_defaults 'avec'"):
        build_head("telme", {"text": 8, "audio": 4}, 3, "categorical", {"paper_defaults": "avec"})


@pytest.mark.parametrize("options", [{"response": False, "feature": False, "fusion": "concat"},
                                     {"paper_defaults": "iemocap"}, {"paper_defaults": "meld", "teacher_dim": 12},
                                     {"paper_defaults": "meld_table", "asf": "equations", "kd_rows": "student",
                                      "teacher_dim": 12}])
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


def test_telme_on_fine_tuned_student_stores_is_asf_with_ce_only(tmp_path):
    """`students: stores` (the paper's two stages): no MLP students; the audio store reaches the output through
    ASF as it is, and the loss is the fusion's CE alone (the students were distilled in their own fine-tune)."""
    m, _ = three_modality_data(tmp_path)
    data = CachedDialogues(m, {"text": tmp_path / "t.h5", "audio": tmp_path / "a.h5"})
    torch.manual_seed(0)
    head = build_head("telme", {"text": 8, "audio": 8}, 3, "categorical",
                      {"heads": 2, "dropout": 0.0, "students": "stores"})
    head.prepare(data)
    head.eval()
    batch = data.batch(m.dialogues("train")[:4])
    assert len(head.students) == 0
    out = head(batch)
    total, parts = head.loss(batch, out)
    assert set(parts) == {"fusion"} and float(total.detach()) == pytest.approx(float(head.task_loss(batch, out).detach()))
    batch.valid["audio"][:] = batch.mask
    with torch.no_grad():
        delta = (head(perturbed(batch, "audio", batch.mask)) - head(batch)).abs()
    assert delta[batch.mask].max() > 1e-4
    mlp = build_head("telme", {"text": 8, "audio": 8}, 3, "categorical", {"heads": 2})
    assert set(mlp.students) == {"audio"}
    with pytest.raises(ValueError, match="teacher's dimension 8"):
        build_head("telme", {"text": 8, "audio": 6}, 3, "categorical", {"students": "stores"})
