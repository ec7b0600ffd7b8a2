"""Live fine-tune metrics (pipeline/finetune/live.py): DVCLive files `dvc plots` reads, one row per step across a
resume, and nothing at all without DVCLive."""
import sys

import pytest

from pipeline.finetune.live import LiveMetrics

pytest.importorskip("dvclive")


def rows(path):
    lines = path.read_text().splitlines()
    at = lines[0].split("\t").index("step")
    return [int(ln.split("\t")[at]) for ln in lines[1:]]


def test_a_resumed_fine_tune_logs_each_step_once(tmp_path):
    live = LiveMetrics(tmp_path, 0)
    for step in range(1, 6):
        live.step(step, 1.0 / step)
    live.epoch(5, {"epoch": 0, "dev_wf1": 0.4, "train_loss": 0.5})
    live.close()
    loss = tmp_path / "live/plots/metrics/train/loss.tsv"
    assert rows(loss) == [1, 2, 3, 4, 5] and rows(tmp_path / "live/plots/metrics/dev/wf1.tsv") == [5]
    # the `last` checkpoint was at step 3, inside the epoch: steps 4 and 5 and the epoch's end are done again,
    # and logged once
    live = LiveMetrics(tmp_path, 3, epoch_done=False)
    assert rows(loss) == [1, 2, 3] and rows(tmp_path / "live/plots/metrics/dev/wf1.tsv") == []
    for step in (4, 5):
        live.step(step, 0.1)
    live.epoch(5, {"epoch": 0, "dev_wf1": 0.4, "train_loss": 0.5})
    live.close()
    assert rows(loss) == [1, 2, 3, 4, 5] and rows(tmp_path / "live/plots/metrics/dev/wf1.tsv") == [5]
    # resumed from the epoch's end (step 5): its row stays, nothing is repeated
    live = LiveMetrics(tmp_path, 5, epoch_done=True)
    live.step(6, 0.1)
    live.close()
    assert rows(loss) == [1, 2, 3, 4, 5, 6] and rows(tmp_path / "live/plots/metrics/dev/wf1.tsv") == [5]
    assert not (tmp_path / "dvc.yaml").exists()
    # a fresh fine-tune starts its curves again
    live = LiveMetrics(tmp_path, 0)
    live.step(1, 0.2)
    live.close()
    assert rows(loss) == [1]


def test_without_dvclive_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dvclive", None)   # `import dvclive` raises ImportError
    live = LiveMetrics(tmp_path, 0)
    live.step(1, 0.5)
    live.epoch(1, {"epoch": 0, "dev_wf1": 0.4, "train_loss": 0.5})
    live.close()
    assert not (tmp_path / "live").exists()
