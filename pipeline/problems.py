"""The one record of something wrong with one utterance's input, from prepare through decode and extract to
predict: written to each stage's summary and to each store's `problems` list.

One vocabulary for modalities everywhere: `text`, `audio`, `visual` (the manifest's media column for the
visual modality is `video`, the file it names; `MODALITY_OF_COLUMN` maps the two).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

MODALITY_OF_COLUMN = {"audio": "audio", "video": "visual"}


@dataclass
class Problem:
    utt_id: str
    file: str
    problem: str
    modality: str | None = None   # text | audio | visual; None: the row as a whole (e.g. at prepare)
    action: str = "reported"      # masked (zeros, valid False) | trimmed | reported (kept, decided later)

    def __str__(self) -> str:
        return f"{self.utt_id}: {self.problem} ({self.file})"

    def as_dict(self) -> dict:
        return asdict(self)


def masked_problem(row, file: str, problem: str, modality: str) -> dict:
    """The record of an utterance's `modality` masked by an encoder (a dict, as stores keep them)."""
    return Problem(row["utt_id"], file, problem, modality, "masked").as_dict()
