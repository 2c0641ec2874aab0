"""What an update is judged on: a fresh holdout of its own labels, and the golden suite.

Both come from data a real deployment has at that moment, never from a
scenario:

- **fresh**: each update holds out part of its new labelled rows (the newest
  where timestamps exist, stratified by label). They are never trained on
  (the leakage guard drops their texts by hash), and the gate measures the
  improvement there: the drift that happened, not a set cut in advance.
- **golden**: the regression suite, what the model must keep knowing. It
  starts from the bootstrap's (or the adopted model's) held-out rows, and each
  promoted update's fresh holdout joins it, capped per label with the oldest
  rows dropped first, so a later update may not forget an earlier shift.
  Every version of it is kept in the store under a number and a fingerprint;
  each model version records the fingerprint it was judged on.

Layout::

    evaluation/model=<name>/golden/version=<k>.parquet   text, label, group, added (the suite version it joined)
    evaluation/model=<name>/golden/current.json          {"version", "fingerprint", "rows", "uri"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from refit.data import fingerprint
from refit.errors import RefitError
from refit.store import ObjectStore

UNGROUPED = "ungrouped"
GOLDEN_COLUMNS = ["text", "label", "group", "added"]


def golden_prefix(model_name: str) -> str:
    return f"evaluation/model={model_name}/golden/"


@dataclass(frozen=True)
class Golden:
    """One version of a model's golden suite."""

    frame: pd.DataFrame
    version: int
    fingerprint: str
    uri: str

    @property
    def rows(self) -> int:
        return len(self.frame)

    def tags(self, prefix: str = "refit.golden") -> dict[str, str]:
        """What a model version records about the suite it was judged on."""
        return {f"{prefix}_version": str(self.version), f"{prefix}_fingerprint": self.fingerprint,
                f"{prefix}_rows": str(self.rows), f"{prefix}_uri": self.uri}


def _with_groups(frame: pd.DataFrame, group_of: dict[str, str] | None = None) -> pd.DataFrame:
    """``group`` kept where the rows have one, else taken from the label's known group, else ``ungrouped``."""
    out = frame.copy()
    known = out["group"].astype(object) if "group" in out.columns else pd.Series(None, index=out.index, dtype=object)
    mapped = out["label"].map(group_of or {})
    out["group"] = known.where(known.notna(), mapped).fillna(UNGROUPED).astype(str)
    return out


def write_golden(store: ObjectStore, model_name: str, frame: pd.DataFrame, version: int | None = None) -> Golden:
    """Write a new version of the suite and point ``current.json`` at it.

    ``version`` defaults to the one after the current (1 for a new model).
    """
    prefix = golden_prefix(model_name)
    if version is None:
        current = _current(store, model_name)
        version = (current["version"] + 1) if current else 1
    frame = _with_groups(frame)
    if "added" not in frame.columns:
        frame = frame.assign(added=version)
    frame = frame[GOLDEN_COLUMNS].reset_index(drop=True).astype({"added": "int64"})
    if frame.empty:
        raise RefitError(f"the golden suite of {model_name} would be empty")
    uri = store.put_parquet(f"{prefix}version={version}.parquet", frame)
    golden = Golden(frame, version, fingerprint(frame), uri)
    store.put_bytes(prefix + "current.json", json.dumps(
        {"version": version, "fingerprint": golden.fingerprint, "rows": golden.rows, "uri": uri}).encode())
    return golden


def _current(store: ObjectStore, model_name: str) -> dict | None:
    try:
        return json.loads(store.get_bytes(golden_prefix(model_name) + "current.json"))
    except KeyError:
        return None


def read_golden(store: ObjectStore, model_name: str, version: int | None = None) -> Golden:
    """The current suite (or the given version)."""
    prefix = golden_prefix(model_name)
    if version is None:
        current = _current(store, model_name)
        if current is None:
            raise RefitError(f"no golden suite under {store.uri(prefix)}: run bootstrap (or adopt) first")
        version = int(current["version"])
    try:
        frame = store.get_parquet(f"{prefix}version={version}.parquet")
    except KeyError:
        raise RefitError(f"golden suite version {version} of {model_name} is missing from the store") from None
    return Golden(frame, version, fingerprint(frame), store.uri(f"{prefix}version={version}.parquet"))


def grown(golden: Golden, fresh: pd.DataFrame, max_per_label: int) -> pd.DataFrame:
    """The suite with ``fresh`` joined, each label capped at ``max_per_label`` rows, oldest dropped first.

    A fresh text already in the suite is not added twice. Fresh rows take the
    group their label has in the suite (``ungrouped`` for a label it lacks)
    unless they carry one.
    """
    group_of = dict(zip(golden.frame["label"], golden.frame["group"]))
    new = _with_groups(fresh, group_of)
    present = set(golden.frame["text"].str.strip().str.lower())
    new = new[~new["text"].str.strip().str.lower().isin(present)].assign(added=golden.version + 1)
    both = pd.concat([golden.frame, new[GOLDEN_COLUMNS]], ignore_index=True)
    # Newest first within each label (a later version, then a later row), then the first max_per_label.
    order = both.assign(_row=np.arange(len(both))).sort_values(["added", "_row"], ascending=False)
    kept = order.groupby("label", sort=False).head(max_per_label)
    return both.loc[sorted(kept.index)].reset_index(drop=True)


def split_fresh(new: pd.DataFrame, share: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, fresh holdout) of an update's new labelled rows.

    Texts are deduplicated first (the last label given wins), so no text can
    be on both sides. Within each label, ``share`` of its rows (rounded) are
    held out: the newest by ``timestamp`` where the rows have one, else a
    seeded random pick. A label with a single row trains.
    """
    if not 0 < share < 1:
        raise RefitError(f"fresh_holdout_share must be between 0 and 1, not {share}")
    key = new["text"].astype(str).str.strip().str.lower()
    rows = new[~key.duplicated(keep="last")].copy()
    rng = np.random.default_rng(seed)
    rows["_order"] = (pd.to_datetime(rows["timestamp"], utc=True).rank(method="first").to_numpy()
                      if "timestamp" in rows.columns and rows["timestamp"].notna().all()
                      else rng.permutation(len(rows)).astype(float))
    held = []
    for _, part in rows.groupby("label", sort=True):
        n = int(np.floor(len(part) * share + 0.5)) if len(part) > 1 else 0
        held.extend(part.sort_values("_order").index[len(part) - n:])
    fresh = rows.loc[sorted(held)].drop(columns="_order")
    train = rows.drop(index=held).drop(columns="_order")
    return train.reset_index(drop=True), fresh.reset_index(drop=True)
