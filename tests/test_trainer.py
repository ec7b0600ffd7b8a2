import numpy as np
import pandas as pd
import pytest
import torch

from heads.registry import build_head
from heads.data import IGNORE, CachedDialogues
from heads.trainer import train_head
from pipeline.manifest import Manifest
from pipeline.params import TrainerParams
from conftest import synthetic_manifest, store_from, overfit


def test_batches_pad_and_mask(tmp_path):
    m = synthetic_manifest()
    path = store_from(m, tmp_path / "f.h5", lambda r: [r["turn"], 1.0], 2)
    data = CachedDialogues(m, {"text": path}, normalize=False)
    b = data.batch(m.dialogues("train")[:3])
    lengths = [len(d) for d in m.dialogues("train")[:3]]
    assert b.features["text"].shape == (3, max(lengths), 2)
    assert b.mask.sum(1).tolist() == lengths
    assert (b.labels[~b.mask] == IGNORE).all() and (b.rows[~b.mask] == -1).all()
    assert (b.features["text"][~b.mask] == 0).all()
    assert b.features["text"][0, :lengths[0], 0].tolist() == list(range(lengths[0]))


def test_nan_features_are_masked_not_propagated(tmp_path):
    m = synthetic_manifest()
    path = store_from(m, tmp_path / "f.h5", lambda r: [np.nan if r["turn"] == 1 else 1.0, 2.0], 2)
    data = CachedDialogues(m, {"text": path})
    assert np.isfinite(data.features["text"]).all()
    assert (~data.valid["text"]).sum() == (m.rows["turn"] == 1).sum()


def two_modality_data(tmp_path, task):
    m = synthetic_manifest(dims=task == "dimensional")
    rng = np.random.default_rng(0)
    emb = {u: rng.normal(size=8) for u in m.utt_ids}
    t = store_from(m, tmp_path / "t.h5", lambda r: emb[r["utt_id"]], 8)
    a = store_from(m, tmp_path / "a.h5", lambda r: emb[r["utt_id"]][::-1], 8,
                   valid=np.arange(len(m)) % 3 != 0)   # a third of the audio is masked
    return m, CachedDialogues(m, {"text": t, "audio": a})


@pytest.mark.parametrize("task", ["categorical", "dimensional"])
def test_late_fusion_overfits_a_tiny_batch(tmp_path, task):
    m, data = two_modality_data(tmp_path, task)
    head = build_head("late_fusion", {"text": 8, "audio": 8}, 3 if task == "categorical" else 2, task,
                      {"hidden": 64, "dropout": 0.0})
    assert overfit(head, data.batch(m.dialogues("train")[:4])) > 0.97
    for p in head.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_trainer_selects_on_dev(tmp_path):
    m, data = two_modality_data(tmp_path, "categorical")
    head = build_head("late_fusion", {"text": 8, "audio": 8}, 3, "categorical", {"hidden": 16})
    res = train_head(head, data, TrainerParams(epochs=12, patience=3, batch_dialogues=4, device="cpu"),
                     log=lambda *_: None)
    assert set(res.metrics) == {"dev", "test"}
    scores = [c["dev_score"] for c in res.curves]
    assert res.curves[res.best_epoch]["dev_score"] == max(scores)
    assert len(scores) <= 12 and (len(scores) == 12 or len(scores) - 1 - res.best_epoch == 3)
    from heads.trainer import evaluate

    dev, _ = evaluate(head, data, "dev", 4, torch.device("cpu"))
    assert dev["wf1"] == pytest.approx(max(scores))   # the best dev checkpoint is the one kept


@pytest.mark.parametrize("threads", [1, 0])
def test_trainer_threads_hold_while_a_head_trains_and_are_restored(tmp_path, threads):
    m, data = two_modality_data(tmp_path, "categorical")
    head = build_head("late_fusion", {"text": 8, "audio": 8}, 3, "categorical", {"hidden": 16})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        train_head(head, data, TrainerParams(epochs=2, batch_dialogues=4, device="cpu", threads=threads),
                   log=lambda *_: seen.append(torch.get_num_threads()))
        assert seen and set(seen) == {threads or 2}   # 0: torch's count left as it was
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_class_weights_and_focal_loss_hand_computed():
    from heads import class_weights, focal_loss

    counts = np.array([90, 9, 1])                                         # an imbalanced train split
    w = class_weights(counts, "inverse")
    assert np.allclose(w, np.array([1 / 90, 1 / 9, 1.0]) * 100 / 3)        # mean weight over utterances is 1
    assert np.isclose((w * counts).sum() / counts.sum(), 1.0)
    assert np.allclose(class_weights(counts, "sqrt_inverse"), counts ** -0.5 * 100 / (counts ** 0.5).sum())
    assert class_weights(counts, "none") is None
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    target = torch.tensor([0, 1, 2, IGNORE])
    p = torch.softmax(logits, -1)[torch.arange(3), target[:3]]
    wt = torch.tensor(w)[target[:3]]
    expected = -(wt * (1 - p) ** 2 * p.log()).sum() / wt.sum()
    assert torch.allclose(focal_loss(logits, target, 2.0, torch.tensor(w)), expected)


def test_class_weights_change_the_head_loss(tmp_path):
    """trainer.class_weights reaches the head's task loss: rare-class errors cost more."""
    m = synthetic_manifest(n_dialogues=20)
    path = store_from(m, tmp_path / "f.h5", lambda r: [r["turn"], 1.0], 2)
    data = CachedDialogues(m, {"text": path})
    head = build_head("late_fusion", {"text": 2}, 3, "categorical", {"hidden": 8, "dropout": 0.0})
    batch = data.batch(m.dialogues("train"))
    out = head(batch) + torch.randn(*batch.mask.shape, 3, generator=torch.Generator().manual_seed(0)) * 3
    plain = float(head.task_loss(batch, out))
    y = data.label_ids[(m.rows["split"] == "train").to_numpy()]
    w = torch.tensor(class_weights_of(y, "inverse"))
    head.set_task_loss(w.numpy())
    weighted = float(head.task_loss(batch, out))
    logits, target = out.reshape(-1, 3), batch.labels.reshape(-1)
    keep = target != IGNORE
    nll = -torch.log_softmax(logits[keep], -1)[torch.arange(int(keep.sum())), target[keep]]
    assert weighted == pytest.approx(float((w[target[keep]] * nll).sum() / w[target[keep]].sum()), rel=1e-5)
    assert weighted != pytest.approx(plain, rel=1e-3)


def class_weights_of(y, scheme):
    from heads import class_weights

    return class_weights(np.bincount(y[y >= 0], minlength=3), scheme)


def test_train_stage_with_seeds_reports_mean_and_std(tmp_path, monkeypatch):
    """trainer.seeds trains the head once per seed: metrics.json keeps each seed's metrics and their mean ± std,
    and the bundle is the best seed on dev."""
    import json

    import yaml

    from conftest import REPO
    from heads.bundle import load_head
    from stages import train

    m = synthetic_manifest(n_dialogues=20)
    monkeypatch.chdir(tmp_path)
    m.save("data/manifest/syn")
    rng = np.random.default_rng(0)
    store_from(m, tmp_path / "data/features/syn/text_minilm.h5",
               lambda r: np.r_[rng.normal(size=3), "abc".index(r["label"])], 4)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(datasets=["syn"], train=["text_mlp"])
    params["data"]["syn"] = {"adapter": "generic", "manifest": "x.csv"}
    params["trainer"].update(seeds=[3, 1, 2], epochs=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    train.main(["--dataset", "syn", "--head", "text_mlp"])
    metrics = json.loads((tmp_path / "results/syn/text_mlp/metrics.json").read_text())
    assert metrics["seeds"] == [3, 1, 2] and set(metrics["per_seed"]) == {"3", "1", "2"}
    devs = [metrics["per_seed"][s]["dev"]["wf1"] for s in ("3", "1", "2")]
    assert metrics["dev"]["wf1"] == pytest.approx(np.mean(devs)) and metrics["dev_std"]["wf1"] == pytest.approx(np.std(devs))
    assert metrics["per_seed"][str(metrics["kept_seed"])]["dev"]["wf1"] == max(devs)
    _, meta = load_head(tmp_path / "models/syn/text_mlp.safetensors")
    assert meta["seed"] == metrics["kept_seed"]
    table = pd.read_csv(tmp_path / "results/syn/text_mlp/predictions_test.csv")
    probs = table[[f"p_{c}" for c in "abc"]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0) and (table["prediction"] == np.array(list("abc"))[probs.argmax(1)]).all()


@pytest.mark.parametrize("dims", [False, True], ids=["categorical", "dimensional"])
def test_the_train_stage_writes_every_declared_output_without_a_test_split(tmp_path, monkeypatch, dims):
    """MELD from its train and dev CSVs has no test rows: the stage still writes each output dvc.yaml declares
    (confusion.png of dev, an empty predictions_test.csv), so `dvc repro` does not fail after training."""
    import yaml

    from conftest import REPO
    from stages import train

    m = synthetic_manifest(n_dialogues=10, dims=dims)
    m = Manifest(m.rows[m.rows["split"] != "test"].reset_index(drop=True), m.meta)
    monkeypatch.chdir(tmp_path)
    m.save("data/manifest/syn")
    store_from(m, tmp_path / "data/features/syn/text_minilm.h5", lambda r: np.full(4, "abc".index(r["label"])), 4)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(datasets=["syn"], train=["text_mlp"])
    params["data"]["syn"] = {"adapter": "generic", "manifest": "x.csv"}
    params["trainer"].update(seeds=[0], epochs=2, device="cpu")
    if dims:
        params["heads"]["text_mlp"]["task"] = "dimensional"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    train.main(["--dataset", "syn", "--head", "text_mlp"])
    out = tmp_path / "results/syn/text_mlp"
    assert (out / "confusion.png").stat().st_size > 0
    dev = pd.read_csv(out / "predictions_dev.csv")
    assert len(dev) == (m.rows["split"] == "dev").sum()
    test = pd.read_csv(out / "predictions_test.csv")
    assert len(test) == 0 and list(test.columns) == list(dev.columns)
