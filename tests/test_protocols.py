"""Evaluation protocols: fold assignment (no dialogue tested twice, each session tested once, dev never from
the test session, reproducible with the seed) and label maps applied before scoring."""
import numpy as np
import pandas as pd
import pytest

from pipeline.manifest import Manifest, ManifestMeta
from pipeline.metrics import score_table
from pipeline.params import ParamsError, from_dict
from pipeline.protocols import (IEMOCAP4, PRESETS, LabelMap, ProtocolError, ProtocolParams, apply_fold, fold_splits,
                                groups_of)

SIX = ["happy", "sad", "neutral", "angry", "excited", "frustrated"]


def iemocap_like(sessions=5, dialogues=4, turns=5, seed=0) -> Manifest:
    """IEMOCAP's naming: dialogues Ses0<n><F|M>_impro0<k>, sessions 1-4 train/dev, 5 test."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, sessions + 1):
        for k in range(dialogues):
            dia = f"Ses0{s}{'FM'[k % 2]}_impro0{k}"
            for t in range(turns + k % 3):   # dialogues of different lengths
                rows.append({"utt_id": f"{dia}_F{t:03d}", "dataset": "iemocap", "dialogue_id": dia, "turn": t,
                             "split": "test" if s == sessions else ("dev" if k == 0 else "train"),
                             "speaker": f"Ses0{s}{'FM'[t % 2]}", "text": "hi", "label": SIX[rng.integers(6)]})
    return Manifest(pd.DataFrame(rows), ManifestMeta(dataset="iemocap", root=None, labels=SIX))


LOSO = ProtocolParams(kind="leave_one_group_out", group="session", dev_fraction=0.25, seed=3)


def session(dialogue_ids: pd.Series) -> pd.Series:
    return dialogue_ids.str[3:5].astype(int)


def test_leave_one_session_out():
    m = iemocap_like()
    splits = fold_splits(m.rows, LOSO)
    assert list(splits.columns) == [f"session{s}" for s in range(1, 6)]
    sess = session(m.rows["dialogue_id"])
    tested = []
    for fold in splits:
        split = splits[fold]
        test_sessions = set(sess[split == "test"])
        assert len(test_sessions) == 1 and fold == f"session{test_sessions.pop()}"
        tested.append(int(fold[-1]))
        held = int(fold[-1])
        assert (split[sess == held] == "test").all()                  # the whole session, nothing else
        assert not (sess[split == "dev"] == held).any()               # dev never from the test session
        assert (split == "dev").any() and (split == "train").any()
        # dev is whole dialogues, a quarter of the training ones
        train_dialogues = m.rows.loc[split != "test", "dialogue_id"].nunique()
        assert m.rows.loc[split == "dev", "dialogue_id"].nunique() == round(0.25 * train_dialogues)
        assert (pd.Series(split.to_numpy()).groupby(m.rows["dialogue_id"].to_numpy()).nunique() == 1).all()
    assert sorted(tested) == [1, 2, 3, 4, 5]                          # each session tested exactly once


def test_folds_are_reproducible_with_the_seed():
    m = iemocap_like()
    a, b = fold_splits(m.rows, LOSO), fold_splits(m.rows, LOSO)
    pd.testing.assert_frame_equal(a, b)
    other = fold_splits(m.rows, ProtocolParams(kind="leave_one_group_out", group="session", dev_fraction=0.25, seed=4))
    assert (other["session1"] == "test").equals(a["session1"] == "test")    # the test fold is the session
    assert not other.equals(a)                                             # the dev draw is the seed's
    # row order does not matter: shuffled rows get the same split per utterance
    shuffled = m.rows.sample(frac=1.0, random_state=0)
    again = fold_splits(shuffled, LOSO)
    assert again.loc[m.rows.index].equals(a)


def test_kfold_by_dialogue_tests_each_dialogue_once():
    m = iemocap_like(sessions=3, dialogues=7)
    k = ProtocolParams(kind="kfold", folds=4, seed=1)
    splits = fold_splits(m.rows, k)
    assert list(splits.columns) == ["fold1", "fold2", "fold3", "fold4"]
    times_tested = {}
    for fold in splits:
        for d in m.rows.loc[splits[fold] == "test", "dialogue_id"].unique():
            times_tested[d] = times_tested.get(d, 0) + 1
        # a dialogue is on one side of each split only
        assert (pd.Series(splits[fold].to_numpy()).groupby(m.rows["dialogue_id"].to_numpy()).nunique() == 1).all()
    assert set(times_tested) == set(m.rows["dialogue_id"]) and set(times_tested.values()) == {1}
    sizes = [(splits[f] == "test").sum() for f in splits]
    assert max(sizes) - min(sizes) <= m.rows.groupby("dialogue_id").size().max()   # balanced by utterances
    # by a column that groups dialogues: the speaker's session from the `speaker` column would split dialogues
    with pytest.raises(ProtocolError, match="spans several groups"):
        groups_of(m.rows, ProtocolParams(kind="kfold", folds=2, group="speaker"))
    with pytest.raises(ProtocolError, match="3 folds of 2 group"):
        fold_splits(iemocap_like(sessions=2).rows, ProtocolParams(kind="kfold", folds=3, group="session"))


def test_bad_groups_are_named():
    m = iemocap_like(sessions=2)
    rows = m.rows.assign(dialogue_id=m.rows["dialogue_id"].str.replace("Ses01F_impro00", "call_7", regex=False))
    with pytest.raises(ProtocolError, match="call_7.*does not match"):
        fold_splits(rows, LOSO)
    with pytest.raises(ProtocolError, match="no column 'room'"):
        fold_splits(m.rows, ProtocolParams(kind="leave_one_group_out", group="room"))
    with pytest.raises(ParamsError, match="data.iemocap.protocol.kind"):
        from_dict(ProtocolParams, {"kind": "loso"}, "data.iemocap.protocol")
    with pytest.raises(ParamsError, match="folds >= 2"):
        from_dict(ProtocolParams, {"kind": "kfold"}, "data.iemocap.protocol")
    with pytest.raises(ParamsError, match="capture group"):
        from_dict(ProtocolParams, {"kind": "kfold", "folds": 2, "group_pattern": "^Ses"}, "p")


def test_official_is_the_manifest_split_and_apply_fold_resplits():
    m = iemocap_like()
    official = fold_splits(m.rows, PRESETS["official"])
    assert list(official.columns) == ["official"] and (official["official"] == m.rows["split"]).all()
    fold = apply_fold(m, fold_splits(m.rows, LOSO), "session2")
    assert set(session(fold.split_rows("test")["dialogue_id"])) == {2}
    assert sorted(fold.utt_ids) == sorted(m.utt_ids)
    with pytest.raises(ProtocolError, match="no fold 'session9'"):
        apply_fold(m, fold_splits(m.rows, LOSO), "session9")


def test_iemocap4_label_map_on_the_manifest():
    m = iemocap_like()
    four = LabelMap.of(PRESETS["iemocap4_loso"])
    mapped = four.apply(m)
    assert mapped.meta.labels == ["happy", "sad", "neutral", "angry"]
    before = m.rows.set_index("utt_id")["label"]
    after = mapped.rows.set_index("utt_id")["label"]
    assert set(after.index) == set(before.index[before != "frustrated"])          # frustrated dropped
    assert (after[before[after.index] == "excited"] == "happy").all()              # excited merged into happy
    assert (after[before[after.index] != "excited"] == before[after.index][before[after.index] != "excited"]).all()
    with pytest.raises(ProtocolError, match="'joy'"):
        LabelMap({"joy": "happy"}).labels(SIX)
    with pytest.raises(ProtocolError, match="every class"):
        LabelMap({}, drop_unlisted=True).labels(SIX)


def test_label_map_is_applied_before_scoring():
    """A six-class model's predictions scored in IEMOCAP's four classes: 'excited' for a true 'happy' is right
    once mapped; frustrated rows are not scored; the merged probability decides the prediction."""
    table = pd.DataFrame({
        "utt_id": ["a", "b", "c", "d"],
        "label": ["happy", "excited", "frustrated", "sad"],
        "prediction": ["excited", "happy", "sad", "sad"],
        "p_happy": [0.1, 0.35, 0.0, 0.3], "p_sad": [0.2, 0.4, 0.9, 0.4], "p_neutral": [0.0, 0.0, 0.0, 0.0],
        "p_angry": [0.0, 0.0, 0.0, 0.0], "p_excited": [0.7, 0.25, 0.1, 0.3], "p_frustrated": [0.0, 0.0, 0.0, 0.0],
    })
    raw = score_table(table, SIX)
    assert raw["accuracy"] == pytest.approx(1 / 4)
    mapped, labels = LabelMap(IEMOCAP4, drop_unlisted=True).map_table(table, SIX)
    assert labels == ["happy", "sad", "neutral", "angry"]
    # b: p_happy + p_excited = 0.6 > p_sad 0.4; d: 0.6 > 0.4 as well, so d becomes a (wrong) happy
    assert mapped["prediction"].tolist() == ["happy", "happy", "sad", "happy"]
    assert mapped["p_happy"].tolist() == pytest.approx([0.8, 0.6, 0.1, 0.6]) and "p_excited" not in mapped
    m = score_table(mapped, labels)
    assert m["support"] == 3 and m["accuracy"] == pytest.approx(2 / 3)
    # without probabilities the predicted label is mapped as it is
    hard, _ = LabelMap(IEMOCAP4, drop_unlisted=True).map_table(table[["utt_id", "label", "prediction"]], SIX)
    assert hard["prediction"].tolist() == ["happy", "happy", "sad", "sad"]
    assert score_table(hard, labels)["accuracy"] == pytest.approx(1.0)


def test_cross_corpus_maps_model_and_data_classes_apart():
    """A MELD model scored on EmoryNLP's shared classes: the model's classes and the data's are named apart."""
    model = LabelMap({"neutral": "neutral", "joy": "joy", "anger": "anger", "sadness": "sadness"}, drop_unlisted=True)
    data = LabelMap({"neutral": "neutral", "joyful": "joy", "mad": "anger", "sad": "sadness"}, drop_unlisted=True)
    meld = ["neutral", "joy", "surprise", "anger", "sadness"]
    table = pd.DataFrame({"utt_id": ["a", "b", "c"], "label": ["joyful", "peaceful", "mad"],
                          "prediction": ["joy", "joy", "surprise"]}).assign(
        **{f"p_{c}": v for c, v in zip(meld, [[0, 0, .1], [.1, .6, .1], [.1, .1, .5], [0, 0, .2], [.8, .3, .1]])})
    mapped, labels = model.map_table(table, meld, truth=data)
    assert labels == ["neutral", "joy", "anger", "sadness"]
    assert mapped["label"].tolist() == ["joy", "", "anger"]          # peaceful: not a shared class, not scored
    # a: p_sadness 0.8 wins; c: surprise (0.5) is not asked, anger (0.2) wins over neutral and joy (0.1)
    assert mapped["prediction"].tolist() == ["sadness", "joy", "anger"]
    assert score_table(mapped, labels)["accuracy"] == pytest.approx(0.5)
