"""Fine-tuning an encoder once per dataset, then caching its best checkpoint as a feature store.

One implementation for every transformers-backed kind (`finetune.<name>.kind`: hf_text, the text teacher;
hf_audio / hf_video, e.g. TelME's students, arXiv 2401.12987), one file per idea, each importing only those
above it:

    batches.py       how an epoch's rows are cut into batches (shuffled, length-grouped, length-sorted steps)
    models.py        the classifiers trained: encoder -> pooled (-> projection) -> dropout -> linear
    lora.py          LoRA adapters through peft (`finetune.<name>.lora`): wrap, hash the base, load an adapter
    llm.py           a decoder-only LLM as the text teacher: instruction prompt, label-word scores or a linear head
    objectives.py    what is minimised (`OBJECTIVES`: `ce` here; TelME's `telme_student` in heads/telme_students.py)
    checkpoint.py    the checkpoint format: safetensors + JSON, never a pickle; RNG states; save, verify, load
    loop.py          `Finetuner`: train (single process or DDP), resume, predict, evaluate
    kinds.py         `FINETUNERS`: TextFinetuner, AudioFinetuner, VideoFinetuner; `build_finetuner`
    store_writer.py  the best checkpoint as an encoder (`FinetunedEncoder`) written to a feature store

A student fine-tune (objective `telme_student`) needs `import heads.telme_students` first: it registers the
objective (pipeline/ imports nothing of heads/).
"""
from pipeline.finetune.batches import MEGA_BATCH, length_grouped_batches, length_sorted_micro_batches
from pipeline.finetune.checkpoint import CheckpointError
from pipeline.finetune.kinds import FINETUNERS, AudioFinetuner, TextFinetuner, VideoFinetuner, build_finetuner
from pipeline.finetune.loop import Finetuner, InterruptTraining, params_identity
from pipeline.finetune.models import AudioClassifier, Classifier, TextClassifier, VideoClassifier
from pipeline.finetune.objectives import OBJECTIVES, CrossEntropy, Objective, TrainedObjective, build_objective
from pipeline.finetune.store_writer import (FinetunedEncoder, FinetunedTextEncoder, finetune_to_store,
                                            finetuned_encoder, write_store)

__all__ = ["MEGA_BATCH", "length_grouped_batches", "length_sorted_micro_batches", "CheckpointError", "FINETUNERS",
           "AudioFinetuner", "TextFinetuner", "VideoFinetuner", "build_finetuner", "Finetuner", "InterruptTraining",
           "params_identity", "AudioClassifier", "Classifier", "TextClassifier", "VideoClassifier", "OBJECTIVES",
           "CrossEntropy", "Objective", "TrainedObjective", "build_objective", "FinetunedEncoder",
           "FinetunedTextEncoder", "finetune_to_store", "finetuned_encoder", "write_store"]
