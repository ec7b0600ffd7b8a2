"""Live metrics of a fine-tune while it runs: the step loss and each epoch's dev score, written by DVCLive
where `dvc plots show` and the DVC editor extension read them (`<checkpoints>/live/`: `metrics.json`, the
latest values, and `plots/metrics/train/loss.tsv`, `dev/wf1.tsv`, ... one row per step).

DVCLive is a dependency of ercflow (beside DVC it adds little), imported only here and only when a fine-tune
starts (it imports DVC: ~1.5 s); where it is missing nothing is written and the fine-tune runs the same. It is told not to touch the project (`save_dvc_exp=False`: no `dvc exp save` inside `dvc repro`;
`dvcyaml=False`: dvc.yaml is ours). Resume-safe: a fine-tune resumed from its `last` checkpoint at step s
drops the rows logged after that checkpoint (before the interruption; they are about to be logged again): step
losses after step s, and an epoch's row at step s too when the checkpoint was taken inside the epoch (the epoch
ends again). Every step appears once. It only logs: the training itself is the same with or without it.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
FOLDER = "live"
STEP_LOSS = "train/loss.tsv"


def _truncate(folder: Path, step: int, epoch_done: bool) -> None:
    """Drop the rows after `step` from DVCLive's metric files under `folder`, and the epoch rows at `step`
    unless the epoch had ended (`epoch_done`)."""
    root = folder / "plots" / "metrics"
    for tsv in root.rglob("*.tsv"):
        last = step if epoch_done or tsv == root / STEP_LOSS else step - 1
        lines = tsv.read_text(encoding="utf-8").splitlines()
        if not lines:
            continue
        header = lines[0].split("\t")
        at = header.index("step") if "step" in header else None
        kept = [ln for ln in lines[1:] if at is None or int(ln.split("\t")[at]) <= last]
        tsv.write_text("\n".join([lines[0], *kept]) + "\n", encoding="utf-8")


class LiveMetrics:
    """`step(n, loss)` per optimizer step, `epoch(n, entry)` per epoch's end, `close()` at the end; does
    nothing when DVCLive is not installed or `enabled` is False (not the main rank). `resume_step`: the step of
    the checkpoint resumed from; `epoch_done`: whether that checkpoint was taken at an epoch's end."""

    def __init__(self, checkpoints: str | Path, resume_step: int = 0, enabled: bool = True, epoch_done: bool = True):
        self.live = None
        if not enabled:
            return
        try:
            from dvclive import Live
        except ImportError:
            log.debug("dvclive is not installed: no live metrics (pip install dvclive)")
            return
        folder = Path(checkpoints) / FOLDER
        if resume_step == 0 and folder.exists():   # a fresh fine-tune: the last one's curves go
            shutil.rmtree(folder)
        elif folder.exists():
            _truncate(folder, resume_step, epoch_done)
        self.live = Live(str(folder), resume=resume_step > 0, save_dvc_exp=False, dvcyaml=False, report=None)
        self.live.step = resume_step

    def step(self, step: int, loss: float) -> None:
        """The running mean loss of the epoch so far, at optimizer step `step`."""
        if self.live is not None:
            self.live.step = step
            self.live.log_metric("train/loss", float(loss))
            self.live.make_summary()

    def epoch(self, step: int, entry: dict) -> None:
        """An epoch's end (the fine-tune's history entry): its dev WF1 and mean train loss."""
        if self.live is not None:
            self.live.step = step
            self.live.log_metric("dev/wf1", float(entry["dev_wf1"]))
            if entry.get("train_loss") is not None:
                self.live.log_metric("train/epoch_loss", float(entry["train_loss"]))
            self.live.summary["epoch"] = entry["epoch"]
            self.live.make_summary()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
            self.live = None
