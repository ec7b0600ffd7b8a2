"""`ercflow inspect [PATH ...]`: one row per store (what it holds, whether it is stale against params.yaml).

PATH is a folder (`data/features/<dataset>`, `data/`), a feature or teacher store (`.h5`) or a media store
(`data/media/<dataset>.h5`); without one, every store under `data/`. A store is stale when the fingerprint its
stage would compute now (params, weights on disk, inputs) differs from the one it records; the reasons are
listed under the table. `--problems` lists the utterances each store masked (or trimmed) and why; `--json`
prints the same for scripts. Exit status 0 (stale or damaged stores included), 2 when a PATH does not exist
or cannot be read at all.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from pipeline import paths
from pipeline.inspect import (ERROR, FRESH, NOT_IN_PARAMS, PARTIAL, STALE, UNKNOWN, Inspector, StoreReport,
                              Unreadable, default_stores, find_stores)

log = logging.getLogger(__name__)

STALE_WORD = {FRESH: "no", STALE: "yes", NOT_IN_PARAMS: "not in params", UNKNOWN: "?", ERROR: "error",
              PARTIAL: "partial"}
COLUMNS = ("store", "encoder", "kind", "weights", "hash", "dim", "rows", "valid", "compute", "stale", "problems")
RIGHT = {"dim", "rows", "valid", "problems"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help=f"a store (.h5), a media store ({paths.media('<dataset>')}) or a folder of stores "
                             f"(default: every store under {paths.DATA}/)")
    parser.add_argument("--problems", action="store_true",
                        help="also list each store's masked (or trimmed) utterances with the reason")
    parser.add_argument("--json", action="store_true", help="machine-readable output (one object, on stdout)")
    parser.add_argument("--params", default=None, metavar="FILE",
                        help=f"the params file staleness is judged against (default: {paths.PARAMS}, when present)")


def run(args) -> int:
    rc = 0
    params, params_error = None, None
    params_path = args.params or paths.PARAMS
    if args.params and not Path(args.params).exists():
        log.error("%s: no such params file", args.params)
        rc, params_error = 2, f"{args.params}: no such params file"
    elif not Path(params_path).exists():
        params_error = f"no {params_path} here: staleness not checked (give --params)"
    else:
        from pipeline.params import load_params

        try:
            params = load_params(params_path)
        except Exception as e:   # a params file that does not parse: every row says so, nothing stops
            params_error = f"{params_path}: {type(e).__name__}: {e}"

    stores: list[Path] = []
    if args.paths:
        for p in args.paths:
            try:
                stores += find_stores(p)
            except (FileNotFoundError, Unreadable) as e:
                log.error("%s", e)
                rc = 2
    else:
        stores = default_stores(paths.DATA)
        if not stores:
            log.warning("no stores under %s/ (run `dvc repro`, or give a PATH)", paths.DATA)
    stores = list(dict.fromkeys(stores))

    inspector = Inspector(params, params_error)
    reports: list[StoreReport] = []
    for s in stores:
        try:
            reports.append(inspect_bundle(s) if s.suffix == ".safetensors" else inspector.inspect(s))
        except Unreadable as e:
            log.error("%s", e)
            reports.append(StoreReport(str(s), ERROR, [str(e)]))
            rc = 2

    if args.json:
        print(json.dumps({"params": params_path if params is not None else None, "params_error": params_error,
                          "stores": [r.to_json(with_problems=args.problems) for r in reports]}, indent=1, default=str))
    else:
        print(render(reports, with_problems=args.problems, params_error=params_error))
    return rc


def inspect_bundle(path: Path) -> StoreReport:
    """A model bundle (`models/<dataset>/<head>.safetensors`): its head and modalities, loaded and verified
    against its tensors' checksum (heads/bundle.py); a damaged or foreign one is an `error` row."""
    from heads.bundle import BundleError, load_head

    try:
        _, meta = load_head(path)
    except BundleError as e:
        msg = str(e)
        return StoreReport(str(path), ERROR, [msg[len(f"{path}: "):] if msg.startswith(f"{path}: ") else msg])
    return StoreReport(str(path), UNKNOWN, kind="bundle", encoder=meta.get("head"), dataset=meta.get("dataset"),
                       weights="+".join(meta.get("modalities") or []), dim=int(meta["n_out"]),
                       details={"task": meta.get("task"), "labels": meta.get("labels")})


# -- plain-text rendering ----------------------------------------------------------------------------

def render(reports: list[StoreReport], with_problems: bool = False, params_error: str | None = None) -> str:
    lines = table([row(r) for r in reports], COLUMNS, RIGHT)
    notes = []
    for r in reports:
        if r.reasons and not (params_error and r.status == UNKNOWN and r.reasons == [params_error]):
            what = {STALE: "stale", ERROR: "error", UNKNOWN: "cannot tell", PARTIAL: "partial",
                    NOT_IN_PARAMS: "not in params"}.get(r.status, r.status)
            notes.append(f"{_rel(r.path)}: {what}")
            notes += [f"  {reason}" for reason in r.reasons]
    if params_error:
        notes.append(f"staleness not checked: {params_error}")
    out = lines + ([""] + notes if notes else [])
    if with_problems:
        for r in reports:
            if r.problems:
                out += ["", f"{_rel(r.path)}: {len(r.problems)} problem(s), {r.masked} masked"]
                cols = ("utt_id", "modality", "action", "file", "problem")   # the reason last: it can be long
                out += ["  " + line for line in table([{c: q.get(c, "") for c in cols} for q in r.problems], cols)]
    return "\n".join(out)


def row(r: StoreReport) -> dict[str, str]:
    valid = "-" if r.valid is None else f"{100 * r.valid:.1f}%"
    return {"store": _rel(r.path), "encoder": r.encoder or "-", "kind": r.kind or "-",
            "weights": _clip(r.weights or "-", 36), "hash": _hashes(r),
            "dim": "-" if r.dim is None else str(r.dim), "rows": "-" if r.rows is None else str(r.rows),
            "valid": valid, "compute": r.compute or "-", "stale": STALE_WORD.get(r.status, r.status),
            "problems": "-" if r.status in (ERROR, PARTIAL) else str(len(r.problems))}


def _hashes(r: StoreReport) -> str:
    """The weights' hash; for a LoRA fine-tune's store the adapter's checkpoint and its base: `adapter+base`."""
    own = (r.weights_hash or "-")[:8]
    return f"{own}+{(r.details.get('base_weights_hash') or '-')[:8]}" if r.details.get("adapter") else own


def table(rows: list[dict[str, str]], columns, right=()) -> list[str]:
    """Rows as aligned plain-text lines under a header."""
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}

    def line(values):
        cells = [str(values[c]).rjust(widths[c]) if c in right else str(values[c]).ljust(widths[c]) for c in columns]
        return "  ".join(cells).rstrip()

    return [line({c: c for c in columns})] + [line(r) for r in rows]


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else "..." + s[-(n - 3):]


def _rel(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel
