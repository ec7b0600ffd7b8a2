"""heads/label_scores.py: a store's own label scores as a head (a teacher's or a zero-shot LLM's test numbers in
the report), and the class-order check of every store's logits (heads/data.py)."""
import numpy as np
import pytest
import torch

from conftest import store_from, synthetic_manifest
from heads.data import CachedDialogues
from heads.registry import build_head
from heads.trainer import train_head
from pipeline.params import TrainerParams


def scored_data(tmp_path, labels=("a", "b", "c"), with_logits=True, n_classes=3):
    m = synthetic_manifest(n_dialogues=15)
    rng = np.random.default_rng(1)
    scores = {u: rng.normal(size=n_classes) for u in m.utt_ids}
    feats = {u: rng.normal(size=6) for u in m.utt_ids}
    path = store_from(m, tmp_path / "t.h5", lambda r: feats[r["utt_id"]], 6,
                      logits=(lambda r: scores[r["utt_id"]]) if with_logits else None,
                      labels=None if labels is None else list(labels))
    return m, CachedDialogues(m, {"text": path}), scores


def head_for(data, **options):
    head = build_head("label_scores", {"text": data.dim("text")}, 3, "categorical", options)
    head.prepare(data)
    return head


def test_the_output_is_the_stores_scores_over_one_temperature(tmp_path):
    m, data, scores = scored_data(tmp_path)
    head = head_for(data).eval()
    batch = data.batch(data.dialogues("test"))
    rows = batch.rows[batch.mask].numpy()
    want = np.stack([scores[m.utt_ids[r]] for r in rows]).astype(np.float32)
    torch.testing.assert_close(head(batch)[batch.mask], torch.from_numpy(want))
    with torch.no_grad():
        head.log_temperature.fill_(np.log(2.0))
    torch.testing.assert_close(head(batch)[batch.mask], torch.from_numpy(want / 2))   # y = s / T
    # the scores are the output: perturb them and it moves; perturb the features and it does not
    moved = data.batch(data.dialogues("test"))
    moved.extra["text_logits"][..., 0] += 5.0
    assert not torch.allclose(head(moved)[moved.mask], head(batch)[batch.mask])
    still = data.batch(data.dialogues("test"))
    still.features["text"] += torch.randn_like(still.features["text"])
    torch.testing.assert_close(head(still), head(batch))


def test_training_fits_the_temperature_alone_and_keeps_the_stores_argmax(tmp_path):
    m, data, scores = scored_data(tmp_path)
    head = head_for(data)
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    assert names == ["log_temperature"]
    train_head(head, data, TrainerParams(epochs=5, lr=0.1, patience=5, batch_dialogues=4, device="cpu"),
               log=lambda *_: None)
    assert float(head.log_temperature.detach()) != 0.0      # the temperature moved (the scores are not calibrated)
    head.eval()
    batch = data.batch(data.dialogues("dev"))
    rows = batch.rows[batch.mask].numpy()
    want = np.stack([scores[m.utt_ids[r]] for r in rows]).argmax(1)
    np.testing.assert_array_equal(head(batch)[batch.mask].argmax(-1).numpy(), want)


def test_a_store_without_logits_or_with_other_classes_is_refused(tmp_path):
    _, data, _ = scored_data(tmp_path / "a", with_logits=False)
    with pytest.raises(ValueError, match=r"holds no `logits`.*input_format: instruction"):
        head_for(data)
    _, data, _ = scored_data(tmp_path / "b", labels=None, n_classes=4)   # a store that does not name its classes
    with pytest.raises(ValueError, match="scores 4 classes, the data has 3"):
        build_head("label_scores", {"text": 6}, 3, "categorical", {}).prepare(data)
    with pytest.raises(ValueError, match="dimensional task"):
        build_head("label_scores", {"text": 6}, 2, "dimensional", {})
    with pytest.raises(ValueError, match="source 'audio'"):
        build_head("label_scores", {"text": 6}, 3, "categorical", {"source": "audio"})


def test_logits_over_another_class_order_are_refused_naming_the_store(tmp_path):
    """A store's logits carry its classes (`labels`): in another order they would be read as the manifest's
    classes, silently (TelME's distillation reads them too)."""
    with pytest.raises(ValueError, match=r"t\.h5: its logits score the classes \['b', 'a', 'c'\]"):
        scored_data(tmp_path, labels=("b", "a", "c"))


def test_check_refuses_a_label_scores_head_on_a_store_without_logits(tmp_path):
    """`ercflow check` knows which stores hold logits (fine-tunes, hf_text with input_format: instruction)
    before any stage runs; the head's source must be one of its modalities."""
    import yaml

    from conftest import REPO
    from ercflow.check import check_params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["heads"].update(
        frozen={"head": "label_scores", "modalities": ["text"]},                    # features.text: text_minilm
        teacher={"head": "label_scores", "modalities": ["text"], "features": {"text": "teacher_minilm"}},
        elsewhere={"head": "label_scores", "modalities": ["text"], "features": {"text": "teacher_minilm"},
                   "options": {"source": "audio"}})
    params["train"] += ["frozen", "teacher", "elsewhere"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    problems = check_params(tmp_path / "params.yaml")
    assert [q.split(":")[0] for q in problems] == ["heads.frozen", "heads.elsewhere.options.source"], problems
    assert "'text_minilm' (encoders, kind 'hf_text') writes none" in problems[0]


def test_label_scores_takes_no_normalize_option(tmp_path):
    """It reads no features, so a `normalize` option would be ignored: `ercflow check` refuses it by name."""
    import yaml

    from conftest import REPO
    from ercflow.check import check_params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["heads"]["scores"] = {"head": "label_scores", "modalities": ["text"], "features": {"text": "teacher_minilm"},
                                 "options": {"normalize": {"text": "none"}}}
    params["train"].append("scores")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    problems = check_params(tmp_path / "params.yaml")
    assert len(problems) == 1 and problems[0].startswith("heads.scores.options") and "normalize" in problems[0], problems
