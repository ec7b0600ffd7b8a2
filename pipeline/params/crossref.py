"""Problems between the sections of params.yaml, after the schema: a listed dataset, encoder, teacher or head
has an entry, a head's store is extracted or fine-tuned and of its modality, teachers and students are of the
kind their stage runs, options that only go together, ... Each problem one line, its params path first."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline import paths
from pipeline.configs import DEFAULT_FINETUNE_KIND, ENCODER_CONFIGS, FINETUNE_CONFIGS, store_modality
from pipeline.params.evaluation import evaluation_problems
from pipeline.params.sections import SampleParams
from pipeline.params.strict import combination_problem
from pipeline.vocab import MODALITIES


def _finetune_problems(teachers: list[str], distil: dict, finetune: dict) -> list[str]:
    """`teachers` are text fine-tunes on the labels (stage finetune_text reads no media); `distil.students`
    are fine-tunes of any kind against `distil.teacher`, a listed teacher (stage finetune_student)."""
    problems = []

    def cfg(n) -> dict:
        return finetune[n] if isinstance(finetune.get(n), dict) else {}

    for i, n in enumerate(teachers):
        c = cfg(n)
        kind = c.get("kind", DEFAULT_FINETUNE_KIND)
        if n in finetune and kind != DEFAULT_FINETUNE_KIND:
            problems.append(f"teachers[{i}]: {n!r} is a {kind} fine-tune: list it in distil.students (stage "
                            "finetune_text fine-tunes text teachers, which read no media)")
        elif c.get("objective", "ce") != "ce":
            problems.append(f"teachers[{i}]: {n!r} has objective {c.get('objective')!r}: a teacher learns from the "
                            "labels (ce); a student of a teacher goes in distil.students")
    students = distil.get("students")
    students = [x for x in students if isinstance(x, str)] if isinstance(students, list) else []
    teacher = distil.get("teacher")
    for i, n in enumerate(students):
        if n in students[:i]:
            problems.append(f"distil.students[{i}]: {n!r} is listed twice")
        elif n not in finetune:
            problems.append(f"distil.students[{i}]: {n!r} has no entry in finetune (defined: {sorted(finetune)})")
        elif n in teachers:
            problems.append(f"distil.students[{i}]: {n!r} is also in teachers (one stage writes a store)")
        elif n == teacher:
            problems.append(f"distil.students[{i}]: {n!r} is distil.teacher itself")
    if students and not teacher:
        problems.append("distil.teacher: missing (the teacher store the students distil from: one of teachers "
                        f"{teachers})")
    elif students and isinstance(teacher, str) and teacher not in teachers:
        problems.append(f"distil.teacher: {teacher!r} is not a fine-tuned teacher (not in teachers: {teachers}); "
                        "its store's logits are distilled")
    for name, c in finetune.items():
        if isinstance(c, dict) and c.get("objective") == "telme_student" and name not in students + teachers:
            problems.append(f"finetune.{name}.objective: telme_student distils distil.teacher's store: list "
                            f"'{name}' in distil.students")
        if isinstance(c, dict) and c.get("kind", DEFAULT_FINETUNE_KIND) in FINETUNE_CONFIGS:
            problems += filter(None, [combination_problem(FINETUNE_CONFIGS[c.get("kind", DEFAULT_FINETUNE_KIND)], c,
                                                          f"finetune.{name}")])
    return problems


def _label_scores_problems(h: str, hp: dict, chosen: dict, modalities, encoders: dict) -> list[str]:
    """A `label_scores` head reads its source store's `logits`: a fine-tune's store (finetune) or an `hf_text`
    encoder's with `input_format: instruction` has them; a frozen encoder's store has none."""
    options = hp.get("options") if isinstance(hp.get("options"), dict) else {}
    source = options.get("source", "text")
    if source not in MODALITIES:   # the schema names it
        return []
    if isinstance(modalities, list) and source not in modalities:
        return [f"heads.{h}.options.source: {source!r} is not among heads.{h}.modalities {modalities}"]
    store = chosen.get(source)
    cfg = encoders.get(store) if isinstance(store, str) else None
    if isinstance(cfg, dict) and not (cfg.get("kind") == "hf_text" and cfg.get("input_format") == "instruction"):
        return [f"heads.{h}: label_scores reads the {source} store's logits, and {store!r} (encoders, kind "
                f"{cfg.get('kind')!r}) writes none: feed it a fine-tuned teacher (finetune) or an hf_text encoder "
                "with input_format: instruction"]
    return []


def cross_reference_problems(raw: Mapping[str, Any]) -> list[str]:
    """Problems between sections (read defensively: the schema reports malformed sections itself)."""
    def names(key) -> list[str]:
        v = raw.get(key)
        return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []

    def section(v) -> dict:
        return v if isinstance(v, dict) else {}

    data, encoders, finetune = section(raw.get("data")), section(raw.get("encoders")), section(raw.get("finetune"))
    heads, features = section(raw.get("heads")), section(raw.get("features"))
    sections = {"datasets": data, "extract": encoders, "teachers": finetune, "train": heads}
    problems = []
    for key, defined in sections.items():
        section_name = {"datasets": "data", "extract": "encoders", "teachers": "finetune", "train": "heads"}[key]
        listed = names(key)
        for i, n in enumerate(listed):
            if n in listed[:i]:
                problems.append(f"{key}[{i}]: {n!r} is listed twice")
            elif n not in defined:
                problems.append(f"{key}[{i}]: {n!r} has no entry in {section_name} (defined: {sorted(defined)})")
    for n in sorted(set(encoders) & set(finetune)):
        problems.append(f"finetune.{n}: also the name of encoders.{n}; both would write "
                        f"{paths.features('<dataset>', n)}")
    problems += _finetune_problems(names("teachers"), section(raw.get("distil")), finetune)
    problems += evaluation_problems(raw)   # protocols' and cross-corpus label maps, headline metrics

    for name, d in data.items():
        if not isinstance(d, dict):
            continue
        adapter = d.get("adapter")
        if (adapter == "sample" and name in names("datasets") and d.get("root") == paths.raw(name)
                and name not in names("samples")):
            problems.append(f"data.{name}: its root {paths.raw(name)} is written by "
                            f"{paths.stage_name(paths.MAKE_SAMPLE, name)}: list "
                            f"'{name}' in `samples`")
        if adapter == "meld" and not (d.get("root") or d.get("csv_dir")):
            problems.append(f"data.{name}.root: missing (the meld adapter needs `root`, or `csv_dir` alone for "
                            "the transcripts without clips)")
        elif adapter in ("sample", "iemocap") and not d.get("root"):
            problems.append(f"data.{name}.root: missing (required by the {adapter} adapter)")
        if adapter == "generic" and not d.get("manifest"):
            problems.append(f"data.{name}.manifest: missing (required by the generic adapter)")
        if d.get("csv_dir") is not None and adapter != "meld":
            problems.append(f"data.{name}.csv_dir: only the meld adapter reads it (adapter: {adapter})")

    sample = section(raw.get("sample"))
    for lo, hi in (("min_turns", "max_turns"), ("min_seconds", "max_seconds")):
        a, b = sample.get(lo, getattr(SampleParams, lo)), sample.get(hi, getattr(SampleParams, hi))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
            problems.append(f"sample.{hi}: {b} is below sample.{lo} ({a})")

    def pooling_problems(where: str, cfg: dict, both_ways: bool):
        pooling, fmt = cfg.get("pooling"), cfg.get("input_format")
        if pooling == "mask" and fmt != "prompt":
            problems.append(f"{where}.pooling: 'mask' pools at the prompt's <mask> token: it needs input_format "
                            f"'prompt' (not {fmt!r})")
        elif pooling == "target_mean" and fmt not in ("indi_context", "prompt", "instruction"):
            problems.append(f"{where}.pooling: 'target_mean' averages the target utterance's tokens within its "
                            f"context: it needs input_format 'indi_context', 'prompt' or 'instruction' (not {fmt!r})")
        elif both_ways and fmt == "prompt" and pooling not in ("mask", "target_mean"):
            problems.append(f"{where}.pooling: input_format 'prompt' is pooled at its <mask> token (pooling 'mask') "
                            f"or over the target utterance's tokens ('target_mean'), not {pooling!r}")

    for name, cfg in encoders.items():
        if isinstance(cfg, dict) and cfg.get("kind") == "hf_text":
            pooling_problems(f"encoders.{name}", {"input_format": "utterance", "pooling": "cls", **cfg}, True)
        if isinstance(cfg, dict) and cfg.get("kind") in ENCODER_CONFIGS:   # options its config refuses together
            problems += filter(None, [combination_problem(
                ENCODER_CONFIGS[cfg["kind"]], {k: v for k, v in cfg.items() if k not in ("kind", "modality")},
                f"encoders.{name}")])
    for name, cfg in finetune.items():
        if isinstance(cfg, dict) and cfg.get("kind", DEFAULT_FINETUNE_KIND) == "hf_text":
            pooling_problems(f"finetune.{name}", {"input_format": "indi_context", "pooling": "cls", **cfg}, False)

    def describe(store: str) -> str:
        if isinstance(encoders.get(store), dict):
            modality = store_modality(store, encoders, finetune)
            return f"{'an' if modality == 'audio' else 'a'} {modality} encoder ({encoders[store].get('kind')})"
        cfg = finetune.get(store) if isinstance(finetune.get(store), dict) else {}
        if cfg.get("kind", DEFAULT_FINETUNE_KIND) == DEFAULT_FINETUNE_KIND:
            return "a text teacher (finetune)"
        modality = store_modality(store, encoders, finetune)
        return f"{'an' if modality == 'audio' else 'a'} {modality} fine-tune (finetune, {cfg.get('kind')})"

    distil = section(raw.get("distil"))
    students = [x for x in distil.get("students", []) if isinstance(x, str)] \
        if isinstance(distil.get("students"), list) else []
    extracted, tuned = names("extract"), names("teachers") + students
    reported, storeless = set(), {}
    for h in names("train"):   # every modality of a trained head reads a store this pipeline writes
        hp = heads.get(h)
        if not isinstance(hp, dict):
            continue
        own = section(hp.get("features"))
        chosen = {**features, **own}
        modalities = hp.get("modalities", list(MODALITIES))
        if hp.get("head") == "label_scores":
            problems += _label_scores_problems(h, hp, chosen, modalities, encoders)
        for i, m in enumerate(modalities if isinstance(modalities, list) else []):
            if m not in MODALITIES:
                continue
            if m in modalities[:i]:
                problems.append(f"heads.{h}.modalities[{i}]: {m!r} is listed twice")
                continue
            if m not in chosen:
                storeless.setdefault(m, []).append(h)
                continue
            store, where = chosen[m], (f"heads.{h}.features.{m}" if m in own else f"features.{m}")
            if isinstance(store, str) and store not in extracted and store not in tuned:
                reported.add(where)
                problems.append(f"{where}: {store!r} is not extracted or fine-tuned (not in extract: {extracted} "
                                f"nor teachers: {names('teachers')}" + (f" nor distil.students: {students}"
                                                                         if students else "") + ")")
    for m, hs in storeless.items():
        problems.append(f"heads.{hs[0]}.modalities: no store for {m!r}" + (f" (nor for heads {', '.join(hs[1:])})"
                        if len(hs) > 1 else "") + f": set features.{m} (or heads.<name>.features.{m})")
    entries = [(f"features.{m}", m, s) for m, s in features.items()]
    entries += [(f"heads.{h}.features.{m}", m, s) for h, hp in heads.items() if isinstance(hp, dict)
                for m, s in section(hp.get("features")).items()]
    for where, m, store in entries:
        if not isinstance(store, str) or where in reported:
            continue
        if store not in encoders and store not in finetune:
            problems.append(f"{where}: {store!r} is neither an encoder nor a teacher (encoders: {sorted(encoders)}, "
                            f"finetune: {sorted(finetune)})")
            continue
        modality = store_modality(store, encoders, finetune)
        if m in MODALITIES and modality in MODALITIES and modality != m:
            problems.append(f"{where}: {store!r} is {describe(store)}, not {m}")
    return problems
