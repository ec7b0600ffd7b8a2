"""The manifest: one typed, validated row per utterance (docs/design.md, "Manifest").

A manifest lives in a folder: `manifest.csv` (the rows) and `meta.json` (dataset name, media root, label
order, dimensional columns). Row order is the index every store follows.

Media paths (`video`, `audio`) are relative to the dataset root and must stay inside it once `..` and
symlinks are resolved (docs/security.md): `resolve_media_path` is the one rule, checked for every
row whenever a manifest is built or loaded, unless the dataset sets `allow_outside_root`. A manifest without
a root (a text-only dataset) may not name media files; an empty media value means the utterance has none.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import UserError

SPLITS = ("train", "dev", "test")
MEDIA_COLUMNS = ("video", "audio")
DIMENSIONS = ("valence", "arousal", "expectancy", "power")
COLUMNS = {
    # name: (dtype, required)
    "utt_id": (str, True),
    "dataset": (str, True),
    "split": (str, True),
    "dialogue_id": (str, True),
    "turn": (int, True),
    "speaker": (str, True),
    "text": (str, True),
    "label": (str, False),
    "valence": (float, False),
    "arousal": (float, False),
    "expectancy": (float, False),
    "power": (float, False),
    "video": (str, False),
    "audio": (str, False),
    "start": (float, False),
    "end": (float, False),
}


class ManifestError(UserError, ValueError):
    pass


@dataclass
class ManifestMeta:
    dataset: str
    root: str | None                                       # media paths are relative to it; None: no media
    labels: list[str] = field(default_factory=list)        # categorical label order (class index)
    dimensions: list[str] = field(default_factory=list)    # dimensional columns present
    allow_outside_root: bool = False                       # media paths may leave `root` (data.<name>.allow_outside_root)
    unlabelled: bool = False                               # no targets at all: a conversation to predict


class OutsideRootError(ManifestError):
    """A media path that leaves the dataset root. `details`: the refused rows, without advice (a caller with
    another way to allow them, `ercflow predict --allow-outside-root`, gives its own)."""

    def __init__(self, message: str, details: str | None = None):
        super().__init__(message)
        self.details = details if details is not None else message


def resolve_media_path(root: str | Path | None, rel: str, allow_outside: bool = False,
                       _real: dict[str, str] | None = None) -> Path:
    """The file a media path names: `root / rel` with `..` and symlinks resolved (as `Path.resolve`). Refused
    (`OutsideRootError`) when it leaves the resolved root (`../x.mp4`, an absolute path elsewhere, a symlink
    pointing out), unless `allow_outside`; a `ManifestError` when there is no root to resolve against.
    `_real` caches resolved folders across the calls of one check (a dataset has few folders, many files)."""
    if not root:
        raise ManifestError(f"{rel!r} needs a dataset root to resolve against, and the dataset has none")
    root, cache = str(root), {} if _real is None else _real
    full = os.path.join(root, rel)             # an absolute `rel` replaces the root, as with pathlib
    folder, name = os.path.split(full)
    if name in ("", ".", "..") or os.path.islink(full):
        real = os.path.realpath(full)
    else:                                      # the same as realpath(full): the file itself is no symlink
        if folder not in cache:
            cache[folder] = os.path.realpath(folder)
        real = os.path.join(cache[folder], name)
    if not allow_outside:
        if root not in cache:
            cache[root] = os.path.realpath(root)
        base = cache[root]
        if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
            raise OutsideRootError(f"{rel!r} resolves to {real}, outside the dataset root {root}")
    return Path(real)


def check_media_paths(df: pd.DataFrame, meta: ManifestMeta) -> None:
    """Every media path of `df` stays inside `meta.root` (see `resolve_media_path`), or a `ManifestError`
    naming the row (counted from 1 in the table's order, header not counted), its utt_id, column and path."""
    seen: dict[str, str | None] = {}       # path -> why it is refused (None: fine)
    real: dict[str, str] = {}
    bad = []
    for col in [c for c in MEDIA_COLUMNS if c in df.columns]:
        for row, (utt, rel) in enumerate(zip(df["utt_id"], df[col]), start=1):
            if not rel:
                continue
            if rel not in seen:
                try:
                    resolve_media_path(meta.root, rel, meta.allow_outside_root, real)
                    seen[rel] = None
                except ManifestError as e:
                    seen[rel] = str(e)
            if seen[rel] is not None:
                bad.append(f"row {row} (utt_id {utt}): {col} path {seen[rel]}")
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        details = f"{'; '.join(bad[:3])}{more}"
        if not meta.root:
            raise ManifestError(f"manifest of '{meta.dataset}': {details}. Set data.{meta.dataset}.root to the "
                                "folder media paths are relative to")
        raise OutsideRootError(f"manifest of '{meta.dataset}': {details}. Media paths must stay inside the dataset "
                               f"root; set data.{meta.dataset}.allow_outside_root: true only for a manifest you "
                               "trust", details)


def _bad_rows(df: pd.DataFrame, mask, what: str) -> str:
    ids = df.loc[mask, "utt_id"].astype(str).tolist()
    more = f" (+{len(ids) - 10} more)" if len(ids) > 10 else ""
    return f"{what}: {', '.join(ids[:10])}{more}"


@dataclass
class Manifest:
    rows: pd.DataFrame
    meta: ManifestMeta

    def __post_init__(self):
        self.rows = self.validate(self.rows, self.meta)

    # -- contract ---------------------------------------------------------------------------------
    @staticmethod
    def validate(df: pd.DataFrame, meta: ManifestMeta) -> pd.DataFrame:
        """Check types and invariants; return the frame with canonical dtypes and order."""
        df = df.copy()
        missing = [c for c, (_, req) in COLUMNS.items() if req and c not in df.columns]
        if missing:
            raise ManifestError(f"manifest of '{meta.dataset}' lacks required column(s) {missing}")
        unknown = sorted(set(df.columns) - set(COLUMNS))
        if unknown:
            raise ManifestError(f"manifest of '{meta.dataset}' has unknown column(s) {unknown}")
        for col, (typ, _) in COLUMNS.items():
            if col not in df.columns:
                continue
            if typ is str:
                df[col] = df[col].where(df[col].notna(), "").astype(str)
            elif typ is int:
                try:
                    df[col] = df[col].astype(np.int64)
                except (ValueError, TypeError) as e:
                    raise ManifestError(f"manifest of '{meta.dataset}': column '{col}' must be integer ({e})")
            else:
                df[col] = pd.to_numeric(df[col], errors="coerce").astype(np.float64)
        check_media_paths(df, meta)
        dup = df["utt_id"].duplicated(keep=False)
        if dup.any():
            raise ManifestError(_bad_rows(df, dup, "duplicate utt_id"))
        if (df["utt_id"] == "").any():
            raise ManifestError("manifest has rows with an empty utt_id")
        bad_split = ~df["split"].isin(SPLITS)
        if bad_split.any():
            raise ManifestError(_bad_rows(df, bad_split, f"split not in {SPLITS}"))
        dup_turn = df.duplicated(["dialogue_id", "turn"], keep=False)
        if dup_turn.any():
            raise ManifestError(_bad_rows(df, dup_turn, "two utterances share (dialogue_id, turn)"))
        mixed = df.groupby("dialogue_id")["split"].nunique() > 1
        if mixed.any():
            raise ManifestError(f"dialogues spanning several splits: {mixed[mixed].index.tolist()[:10]}")
        has_dims = [d for d in DIMENSIONS if d in df.columns]
        if "label" not in df.columns and not has_dims and not meta.unlabelled:
            raise ManifestError(f"manifest of '{meta.dataset}' has neither 'label' nor dimensional columns")
        if "label" in df.columns and meta.labels:
            unknown_label = ~df["label"].isin(meta.labels)
            if unknown_label.any():
                raise ManifestError(_bad_rows(df, unknown_label, f"label not in {meta.labels}"))
        if "start" in df.columns and "end" in df.columns:
            span = df["start"].notna() & df["end"].notna()
            backwards = span & (df["end"] <= df["start"])
            if backwards.any():
                raise ManifestError(_bad_rows(df, backwards, "end <= start"))
        split_order = {s: i for i, s in enumerate(SPLITS)}
        df = df.assign(_s=df["split"].map(split_order), _d=df["dialogue_id"].map(_natural_key))
        df = df.sort_values(["_s", "_d", "turn"], kind="stable").drop(columns=["_s", "_d"])
        return df.reset_index(drop=True)

    # -- access -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def utt_ids(self) -> list[str]:
        return self.rows["utt_id"].tolist()

    def split_rows(self, split: str) -> pd.DataFrame:
        return self.rows[self.rows["split"] == split]

    def dialogues(self, split: str | None = None) -> list[np.ndarray]:
        """Row indices of each dialogue, in turn order."""
        df = self.rows if split is None else self.split_rows(split)
        return [g.index.to_numpy() for _, g in df.groupby("dialogue_id", sort=False)]

    def speaker_index(self) -> np.ndarray:
        """Speaker id per row, bounded per dialogue: order of first appearance (0, 1, 2, ...)."""
        out = np.zeros(len(self.rows), dtype=np.int64)
        for idx in self.dialogues():
            seen: dict[str, int] = {}
            for i in idx:
                out[i] = seen.setdefault(self.rows.at[i, "speaker"], len(seen))
        return out

    def label_index(self) -> np.ndarray:
        """Class index per row (-1 where the row has no categorical label)."""
        lookup = {name: i for i, name in enumerate(self.meta.labels)}
        if "label" not in self.rows.columns:
            return np.full(len(self.rows), -1, dtype=np.int64)
        return self.rows["label"].map(lambda s: lookup.get(s, -1)).to_numpy(dtype=np.int64)

    def media_path(self, rel: str) -> Path:
        """The file a media path of this manifest names (resolved; refused outside the root, see above)."""
        return resolve_media_path(self.meta.root, rel, self.meta.allow_outside_root)

    # -- files ------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "manifest.csv.tmp"
        self.rows.to_csv(tmp, index=False)
        os.replace(tmp, folder / "manifest.csv")
        (folder / "meta.json").write_text(json.dumps(asdict(self.meta), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        folder = Path(folder)
        meta = ManifestMeta(**json.loads((folder / "meta.json").read_text()))
        rows = pd.read_csv(folder / "manifest.csv", dtype={"utt_id": str, "dialogue_id": str,
                                                           "speaker": str, "text": str, "label": str},
                           keep_default_na=False, na_values={c: [""] for c in COLUMNS if COLUMNS[c][0] is float})
        return cls(rows, meta)


def _natural_key(s: str):
    """'dia10' after 'dia9': split digits out so dialogue order is the human one."""
    import re
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s)))
