"""A store's own label scores as a head: the classifier that a fine-tuned teacher (an `hf_text` fine-tune, with
or without LoRA) or an LLM's zero-shot label scoring (`input_format: instruction`) already is, scored by the
train stage like any head. So the teacher's or the zero-shot LLM's own test numbers stand in the report beside
the heads built on its features, with the same metrics, confidence intervals and paired tests, and a paper's
claim about the LLM itself (InstructERC arXiv 2309.11911, BiosERC arXiv 2407.04279, PRC-Emo arXiv 2511.07061:
the LLM is the classifier there) has a row of ours to stand beside.
"""
from __future__ import annotations

import torch
from torch import nn

from heads import ERCHead, register
from heads.data import DialogueBatch
from pipeline.vocab import Modality


@register("label_scores")
class LabelScores(ERCHead):
    """y = s / T: s the `logits` [C] that the `source` modality's store holds for the utterance (a fine-tuned
    checkpoint's classifier output, or each label word's log-probability as the answer), T = exp(t) > 0 the
    one learned parameter, a temperature (t starts at 0). Dividing by T calibrates the probabilities and leaves
    the argmax, and so WF1, UA and accuracy, the store's own; the train stage fits t alone. The features are
    not read, and an utterance whose store row is masked gets uniform scores (its logits are zeros)."""

    def __init__(self, dims, n_out, task, source: Modality = "text"):   # no `normalize`: it reads no features
        super().__init__(dims, n_out, task)
        if task != "categorical":
            raise ValueError("label_scores: a store's label scores are class scores; a dimensional task has none")
        if source not in self.dims:
            raise ValueError(f"label_scores: source '{source}' is not among the head's modalities {self.modalities}")
        self.source = source
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def prepare(self, data) -> None:
        """Refuse a store without `logits`, or with another number of classes, before any training."""
        scores = data.extra.get(f"{self.source}_logits")
        encoder = (data.provenance.get(self.source) or {}).get("encoder")
        if scores is None:
            raise ValueError(f"label_scores: the {self.source} store (encoder '{encoder}') holds no `logits`: "
                             "a fine-tuned teacher's store or an hf_text store with input_format: instruction has them")
        if scores.shape[-1] != self.n_out:
            raise ValueError(f"label_scores: the {self.source} store (encoder '{encoder}') scores "
                             f"{scores.shape[-1]} classes, the data has {self.n_out}")

    def forward(self, batch: DialogueBatch) -> torch.Tensor:
        scores = batch.extra.get(f"{self.source}_logits")
        if scores is None:   # predict on stores of another kind than the head was trained on
            raise ValueError(f"label_scores: the {self.source} store holds no `logits`")
        return scores / self.log_temperature.exp()
