"""Loading labelled text: CLINC150 from disk, its hub copy, or any table file.

Every loader returns one frame with the columns ``text``, ``label``, ``split``
(train/val/test) and ``group`` (the domain a label belongs to, or the label
itself when the data names no domains), so scenarios are written once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from refit.errors import RefitError

COLUMNS = ["text", "label", "split", "group"]
OOS = "oos"


def clinc150_files(directory: Path) -> tuple[Path, Path]:
    """CLINC150's data and domain files in ``directory``; a RefitError names what is missing."""
    directory = Path(directory)
    data_file, domain_file = directory / "data_full.json", directory / "domains.json"
    if not directory.is_dir():
        raise RefitError(f"data directory {directory} does not exist (set REFIT_DATA_DIR)")
    for needed in (data_file, domain_file):
        if not needed.is_file():
            raise RefitError(f"data directory {directory} has no {needed.name}")
    return data_file, domain_file


def load_clinc150(directory: Path) -> pd.DataFrame:
    """CLINC150 as published (``data_full.json`` and ``domains.json``).

    Out-of-scope queries keep the label ``oos`` and form their own group.
    """
    data_file, domain_file = clinc150_files(directory)
    raw = json.loads(data_file.read_text())
    domains = json.loads(domain_file.read_text())
    group_of = {label: domain for domain, labels in domains.items() for label in labels}
    group_of[OOS] = OOS
    rows = []
    for key, split in (("train", "train"), ("val", "val"), ("test", "test"),
                       ("oos_train", "train"), ("oos_val", "val"), ("oos_test", "test")):
        rows.extend((text, label, split, group_of.get(label, label)) for text, label in raw.get(key, []))
    return pd.DataFrame(rows, columns=COLUMNS)


def load_hub_clinc(config: str = "plus") -> pd.DataFrame:
    """The public hub copy ``clinc_oos`` (needs the hub or its local cache).

    The hub copy carries no domains, so each label is its own group unless
    the scenario maps labels to groups.
    """
    try:
        from datasets import load_dataset

        dataset = load_dataset("clinc_oos", config)
    except Exception as exc:  # the hub raises many types when offline
        raise RefitError(f"could not load clinc_oos from the hub or its cache: {exc}") from exc
    names = dataset["train"].features["intent"].names
    frames = []
    for split, ours in (("train", "train"), ("validation", "val"), ("test", "test")):
        part = dataset[split].to_pandas()
        labels = [names[i] for i in part["intent"]]
        frames.append(pd.DataFrame({"text": part["text"], "label": labels, "split": ours, "group": labels}))
    return pd.concat(frames, ignore_index=True)


def existing_file(path: Path) -> Path:
    """``path``, if it is a file; a RefitError naming it if not."""
    path = Path(path)
    if not path.is_file():
        raise RefitError(f"data file {path} does not exist")
    return path


def read_table(path: Path) -> pd.DataFrame:
    """Read CSV, Parquet, JSON or JSON lines by extension."""
    path = existing_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            try:
                return pd.read_json(path)
            except ValueError:
                return pd.read_json(path, lines=True)
    except Exception as exc:
        raise RefitError(f"could not read {path}: {exc}") from exc
    raise RefitError(f"{path}: unsupported file type {suffix!r} (use .csv, .parquet, .json or .jsonl)")


def _hash_split(text: str) -> str:
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 85 else "test"


def load_table(
    path: Path,
    text_column: str = "text",
    label_column: str = "label",
    split_column: str | None = None,
    group_column: str | None = None,
) -> pd.DataFrame:
    """Any table with text and label columns, normalised to ``COLUMNS``.

    Without a split column, rows are split 70/15/15 by a hash of the text, so
    the split is stable across runs and the same text never lands in two splits.
    """
    frame = read_table(path)
    for column in (text_column, label_column, split_column, group_column):
        if column is not None and column not in frame.columns:
            raise RefitError(f"{path} has no column {column!r} (columns: {', '.join(map(str, frame.columns))})")
    missing = frame[text_column].isna() | frame[label_column].isna()
    if missing.any():
        raise RefitError(f"{path}: {int(missing.sum())} rows have an empty {text_column!r} or {label_column!r}")
    out = pd.DataFrame({"text": frame[text_column].astype(str), "label": frame[label_column].astype(str)})
    out["split"] = frame[split_column].astype(str).replace({"validation": "val"}) if split_column else out["text"].map(_hash_split)
    out["group"] = frame[group_column].astype(str) if group_column else out["label"]
    return out


def stratified_sample(frame: pd.DataFrame, n: int, seed: int | np.random.Generator,
                      column: str = "label") -> pd.DataFrame:
    """Exactly ``min(n, len(frame))`` rows keeping each ``column`` value's share.

    Shares are split by largest remainder, so small strata are neither
    forced in nor overweighted and the total never exceeds ``n``.
    """
    if len(frame) <= n:
        return frame
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    groups = list(frame.groupby(column, sort=True).indices.items())
    exact = np.array([len(idx) for _, idx in groups]) * n / len(frame)
    take = np.floor(exact).astype(int)
    remainder = exact - take
    for i in np.argsort(-remainder, kind="stable")[: n - take.sum()]:
        take[i] += 1
    picked = [rng.choice(idx, k, replace=False) for (_, idx), k in zip(groups, take) if k]
    return frame.iloc[np.sort(np.concatenate(picked))] if picked else frame.iloc[0:0]


def per_label_sample(frame: pd.DataFrame, n: int, seed: int, column: str = "label") -> pd.DataFrame:
    """Exactly ``min(n, len(frame))`` rows, as even across ``column`` values as their counts allow.

    Each value gets the same share; a value with fewer rows gives what it
    lacks to the others (water-filling), so a label learned from a handful of
    rows is replayed as often as one that has thousands.
    """
    if len(frame) <= n:
        return frame
    rng = np.random.default_rng(seed)
    groups = sorted(frame.groupby(column, sort=True).indices.items(), key=lambda item: len(item[1]))
    take, left = {}, n
    for i, (value, idx) in enumerate(groups):
        share = left // (len(groups) - i)
        take[value] = min(len(idx), share)
        left -= take[value]
    extra = [value for value, idx in reversed(groups) if len(idx) > take[value]]
    for value in extra[:left]:  # the remainder, one each to the largest groups
        take[value] += 1
    picked = [rng.choice(idx, take[value], replace=False) for value, idx in groups if take[value]]
    return frame.iloc[np.sort(np.concatenate(picked))]


def fingerprint(frame: pd.DataFrame, columns: list[str] | None = None) -> str:
    """Content hash of a frame's rows (order-independent): lineage for data."""
    columns = columns or [c for c in ("text", "label") if c in frame.columns]
    hashed = pd.util.hash_pandas_object(frame[columns], index=False).sort_values()
    return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()[:16]


def text_key(text) -> str:
    """A text as compared for sameness: stripped and lower-cased, so case and edge spaces make no new text."""
    return str(text).strip().lower()


def text_keys(texts) -> pd.Series:
    """``text_key`` of each text, as a Series: a Series keeps its index, so the keys line up with its frame."""
    series = texts if isinstance(texts, pd.Series) else pd.Series(list(texts), dtype=object)
    return series.astype(str).str.strip().str.lower()


def text_hash(text: str) -> str:
    """Hash of the normalised text (``text_key``): the leakage guard's key."""
    return hashlib.sha1(text_key(text).encode()).hexdigest()


def text_hashes(texts) -> set[str]:
    return {text_hash(t) for t in texts}
