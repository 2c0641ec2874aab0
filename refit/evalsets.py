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
    evaluation/model=<name>/golden/current.json          {"version", "fingerprint", "rows", "uri"} of the newest

A version, once written, is never written again (each is created only if
absent), so every fingerprint a model version records names one file for good.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from refit.data import fingerprint, text_keys
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


_VERSION_KEY = re.compile(r"version=(\d+)\.parquet")


def suite_versions(store: ObjectStore, model_name: str) -> list[int]:
    """Every version of the suite in the store, oldest first."""
    prefix = golden_prefix(model_name)
    found = (_VERSION_KEY.fullmatch(key[len(prefix):]) for key in store.list(prefix))
    return sorted(int(match.group(1)) for match in found if match)


def write_golden(store: ObjectStore, model_name: str, frame: pd.DataFrame, version: int | None = None) -> Golden:
    """Write ``frame`` as a new version of the suite, never over an existing one; the newest if it has these rows.

    Versions are immutable: each is created only if absent (``ObjectStore.create``),
    so a model version's recorded fingerprint always matches the file it
    names. ``version`` (default: the one after the newest) is where to start;
    a number already taken moves to the next free one, and rows stamped as
    added in the number asked for are stamped with the one written. A frame
    with the same rows as the newest version (an adopt run again, a fresh
    holdout the suite already holds) writes nothing and returns that version.
    """
    newest = suite_versions(store, model_name)
    if newest:
        latest = read_golden(store, model_name, newest[-1])
        if latest.fingerprint == fingerprint(frame):
            return latest
    number = version if version is not None else (newest[-1] + 1 if newest else 1)
    asked = number
    while True:
        stamped = frame.assign(added=frame["added"].where(frame["added"] != asked, number)) \
            if "added" in frame.columns else frame
        golden = _create_version(store, model_name, stamped, number)
        if golden is not None:
            return golden
        number = max([number, *suite_versions(store, model_name)]) + 1


def grow_suite(store: ObjectStore, model_name: str, fresh: pd.DataFrame, max_per_label: int) -> Golden:
    """The newest suite with ``fresh`` joined (``suite_with_fresh``), written as the version right after it.

    Built on the newest version at the moment of writing, not on the one an
    update was judged against, so a fresh set that joined meanwhile (an
    update promoted and rolled back while this one trained) is kept. If
    another writer takes that number first, it is built again on theirs:
    no version is overwritten and no row that joined is dropped, except by
    the per-label cap.
    """
    while True:
        latest = read_golden(store, model_name)
        frame = suite_with_fresh(latest, fresh, max_per_label)
        if fingerprint(frame) == latest.fingerprint:
            return latest  # every fresh row is in the suite already
        golden = _create_version(store, model_name, frame, latest.version + 1)
        if golden is not None:
            return golden


def _create_version(store: ObjectStore, model_name: str, frame: pd.DataFrame, version: int) -> Golden | None:
    """Version ``version`` of the suite, created only if absent (None if taken); ``current.json`` then names it."""
    prefix = golden_prefix(model_name)
    frame = _with_groups(frame)
    added = frame["added"] if "added" in frame.columns else pd.Series(version, index=frame.index)
    frame = frame.assign(added=added.fillna(version))[GOLDEN_COLUMNS].reset_index(drop=True).astype({"added": "int64"})
    if frame.empty:
        raise RefitError(f"the golden suite of {model_name} would be empty")
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    key = f"{prefix}version={version}.parquet"
    if not store.create(key, buffer.getvalue()):
        return None
    golden = Golden(frame, version, fingerprint(frame), store.uri(key))
    current = _current(store, model_name)
    if current is None or int(current.get("version", 0)) < version:  # a pointer for people; reads list versions
        store.put_bytes(prefix + "current.json", json.dumps(
            {"version": version, "fingerprint": golden.fingerprint, "rows": golden.rows, "uri": golden.uri}).encode())
    return golden


def _current(store: ObjectStore, model_name: str) -> dict | None:
    try:
        return json.loads(store.get_bytes(golden_prefix(model_name) + "current.json"))
    except (KeyError, ValueError):
        return None


def read_golden(store: ObjectStore, model_name: str, version: int | None = None) -> Golden:
    """The newest suite in the store (or the given version)."""
    prefix = golden_prefix(model_name)
    if version is None:
        found = suite_versions(store, model_name)
        if not found:
            raise RefitError(f"no golden suite under {store.uri(prefix)}: run bootstrap (or adopt) first")
        version = found[-1]
    try:
        frame = store.get_parquet(f"{prefix}version={version}.parquet")
    except KeyError:
        raise RefitError(f"golden suite version {version} of {model_name} is missing from the store") from None
    return Golden(frame, version, fingerprint(frame), store.uri(f"{prefix}version={version}.parquet"))


def suite_with_fresh(golden: Golden, fresh: pd.DataFrame, max_per_label: int) -> pd.DataFrame:
    """The suite with ``fresh`` joined, each label capped at ``max_per_label`` rows, oldest dropped first.

    A fresh text already in the suite is not added twice. Fresh rows take the
    group their label has in the suite (``ungrouped`` for a label it lacks)
    unless they carry one.
    """
    group_of = dict(zip(golden.frame["label"], golden.frame["group"]))
    new = _with_groups(fresh, group_of)
    present = set(text_keys(golden.frame["text"]))
    new = new[~text_keys(new["text"]).isin(present)].assign(added=golden.version + 1)
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
    key = text_keys(new["text"])
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
