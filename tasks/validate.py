"""Validate: check a traffic window before anything measures it.

Bad rows go to ``quarantine/`` with the reason; the counts always add up
(rows in = rows kept + rows quarantined). A window with nothing usable is
rejected with a sentence that says why, not a traceback.

Label feedback is checked the same way before it can train anything
(``validate_labels``), and a batch whose label mix moved far from the
traffic it labels is flagged as a whole (``check_label_mix``): row checks
cannot see poisoning that uses only valid labels.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone
from functools import cache

import numpy as np
import pandas as pd

from refit.errors import RefitError, WindowTooSmall
from refit.store import ObjectStore

MAX_TEXT_CHARS = 2000
INFERENCE_REQUIRED = ["request_id", "timestamp", "text", "predicted_label", "confidence"]
LABEL_REQUIRED = ["request_id", "label"]


@dataclass(frozen=True)
class Validated:
    kept: pd.DataFrame
    rows_in: int
    rows_quarantined: int
    reasons: dict[str, int]
    quarantine_uri: str | None


def split_bad_rows(frame: pd.DataFrame, text_column: str = "text") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Separate usable rows from bad ones; bad rows get a ``reason`` column.

    Raises ``RefitError`` for a window that cannot be read at all: no rows,
    or no text column.
    """
    _require_rows(frame)
    check_columns(frame, [text_column])
    reason = _text_reasons(frame, text_column)
    _mark_duplicates(frame, reason)
    return _split(frame, reason)


def split_bad_inference_rows(frame: pd.DataFrame,
                             required: list[str] = INFERENCE_REQUIRED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``split_bad_rows`` for a window of served requests, with its schema and types checked too.

    A missing ``required`` column rejects the whole window. Row by row, on
    top of the text checks (where a null text, which is how an empty CSV cell
    reads, is "text is missing"), every one of the request log's columns
    that is present is checked: a missing request id, a timestamp that is not a time,
    an empty predicted label, a confidence that is not a number in [0, 1].
    Each bad row gets one reason, the first that applies, so the reasons add
    up to the rows quarantined. The standalone check passes
    ``required=["text"]``: a file of texts alone is checked for what it has.

    Raises:
        RefitError: the window is empty or lacks a required column.
    """
    _require_rows(frame)
    check_columns(frame, list(dict.fromkeys(["text", *required])))
    reason = _text_reasons(frame, "text", missing="text is missing")
    if "request_id" in frame.columns:
        _mark(reason, frame["request_id"].map(_is_blank), "request_id is missing")
    if "timestamp" in frame.columns:
        _mark(reason, _not_a_time(frame["timestamp"]), "timestamp is not a time")
    if "predicted_label" in frame.columns:
        _mark(reason, frame["predicted_label"].map(_is_blank), "predicted_label is missing")
    if "confidence" in frame.columns:
        confidence = pd.to_numeric(frame["confidence"].map(_number_or_none), errors="coerce")
        _mark(reason, ~confidence.between(0.0, 1.0), "confidence is not a number in [0, 1]")
    _mark_duplicates(frame, reason)
    return _split(frame, reason)


def check_columns(frame: pd.DataFrame, required: list[str], what: str = "window") -> None:
    """Raise a ``RefitError`` naming every required column ``frame`` lacks, and the columns it has."""
    missing = [c for c in required if c not in frame.columns]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        raise RefitError(f"{what} has no column{'s' if len(missing) > 1 else ''} {names} "
                         f"(columns: {', '.join(map(str, frame.columns))})")


def validate_labels(labels: pd.DataFrame, known_labels=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a batch of label feedback into rows to keep and rows to quarantine (with a ``reason``).

    Label feedback trains the next model, so a row that cannot be joined to
    its request (no ``request_id``) or says nothing (empty label) is never
    passed on; with ``known_labels``, neither is a label outside them (the
    update flow passes ``None`` and sends unknown labels to the new-label
    policy instead, ``tasks.ingest.admit_new_labels``). Labels are compared as strings. An empty batch is
    no error: it keeps and quarantines nothing.

    Raises:
        RefitError: the batch lacks the ``request_id`` or ``label`` column.
    """
    check_columns(labels, LABEL_REQUIRED, "label batch")
    reason = pd.Series("", index=labels.index, dtype=object)
    _mark(reason, labels["request_id"].map(_is_blank), "request_id is missing")
    blank_label = labels["label"].map(_is_blank)
    _mark(reason, blank_label, "label is empty")
    if known_labels is not None:
        known = {str(label) for label in known_labels}
        _mark(reason, ~blank_label & ~labels["label"].map(lambda v: str(v) in known), "label not known to the model")
    return _split(labels, reason)


def label_mix_shift(reference_labels, new_labels) -> float:
    """Total variation distance between two label mixes: the share of rows that would have to change label.

    0 when the mixes match, 1 when they share no label. It is biased upward
    for small batches over many labels (two samples of 500 and 1,000 rows of
    the same 76-label mix are ~0.19 apart), so a threshold must be set for
    the batch sizes it will see; ``check_label_mix`` applies one.
    """
    reference = pd.Series(reference_labels, dtype=object).dropna().astype(str)
    new = pd.Series(new_labels, dtype=object).dropna().astype(str)
    if reference.empty or new.empty:
        raise RefitError(f"label mix needs labels on both sides, got {len(reference)} and {len(new)}")
    p = reference.value_counts(normalize=True)
    q = new.value_counts(normalize=True)
    everything = p.index.union(q.index)
    return float(0.5 * (p.reindex(everything, fill_value=0) - q.reindex(everything, fill_value=0)).abs().sum())


@dataclass(frozen=True)
class LabelMixCheck:
    """Whether a label batch's mix moved too far from the reference's: a verdict with its reason."""

    shift: float
    threshold: float
    suspect: bool
    reason: str


def check_label_mix(reference_labels, new_labels, threshold: float) -> LabelMixCheck:
    """Flag a label batch whose mix moved more than ``threshold`` (total variation) from the reference.

    A batch of feedback whose labels suddenly favour other intents than the
    traffic it labels is what poisoning or a broken labelling job looks like;
    such a batch is quarantined whole rather than trusted row by row.
    """
    shift = label_mix_shift(reference_labels, new_labels)
    suspect = shift > threshold
    if suspect:
        reason = f"label mix moved {shift:.3f} (total variation) from the reference, above the {threshold} allowed"
    else:
        reason = f"label mix moved {shift:.3f} (total variation), within the {threshold} allowed"
    return LabelMixCheck(shift, threshold, suspect, reason)


def _require_rows(frame: pd.DataFrame) -> None:
    if frame.empty:
        raise WindowTooSmall("window is empty: no requests were logged in it")


def _is_blank(value) -> bool:
    if value is None or (isinstance(value, float) and value != value):
        return True
    if value is pd.NA or value is pd.NaT:
        return True
    return str(value).strip() == ""


def _not_a_time(column: pd.Series) -> pd.Series:
    """Element by element, so one odd value cannot make pandas guess a format that fails the rest."""
    if pd.api.types.is_datetime64_any_dtype(column):
        return column.isna()

    def bad(value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (str, date, np.datetime64)):
            return True
        try:
            return pd.isna(pd.Timestamp(value))
        except (ValueError, TypeError, OverflowError):
            return True

    return column.map(bad)


def _number_or_none(value):
    """Real numbers only: a string such as "0.9" or a bool is a type error in a served request, not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return value


def _text_reasons(frame: pd.DataFrame, text_column: str, missing: str = "text is not a string") -> pd.Series:
    """The text checks; ``missing`` is the reason given to a null text (None, NaN)."""
    text = frame[text_column]
    reason = pd.Series("", index=frame.index, dtype=object)
    not_str = ~text.map(lambda v: isinstance(v, str))
    reason[not_str] = "text is not a string"
    reason[text.isna()] = missing
    stripped = text.where(~not_str, "").str.strip()
    reason[(reason == "") & (stripped == "")] = "text is empty"
    reason[(reason == "") & (stripped.str.len() > MAX_TEXT_CHARS)] = f"text longer than {MAX_TEXT_CHARS} characters"
    return reason


def _mark(reason: pd.Series, bad: pd.Series, why: str) -> None:
    """Give ``why`` to the rows in ``bad`` that have no reason yet (the first reason wins)."""
    reason[(reason == "") & bad.to_numpy(dtype=bool)] = why


def _mark_duplicates(frame: pd.DataFrame, reason: pd.Series) -> None:
    if "request_id" in frame.columns:
        _mark(reason, frame["request_id"].duplicated(), "duplicate request_id")


def _split(frame: pd.DataFrame, reason: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    bad = reason != ""
    quarantined = frame[bad].copy()
    quarantined["reason"] = reason[bad]
    return frame[~bad].reset_index(drop=True), quarantined.reset_index(drop=True)


def _validate_window(store: ObjectStore, model_name: str, frame: pd.DataFrame, min_rows: int,
                    text_column: str = "text", check_schema: bool = False) -> Validated:
    """Quarantine bad rows; reject the window if too few good rows remain.

    With ``check_schema`` the window must be a request-log window (the
    ``INFERENCE_REQUIRED`` columns, text in ``text``) and its columns' types
    are checked row by row too (``split_bad_inference_rows``).
    """
    if check_schema:
        if text_column != "text":
            raise RefitError(f"a request-log window keeps its text in 'text', not {text_column!r}")
        kept, bad = split_bad_inference_rows(frame)
    else:
        kept, bad = split_bad_rows(frame, text_column)
    uri = None
    if len(bad):
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%S.%f") + "-" + uuid.uuid4().hex[:8]
        bad = bad.astype({c: str for c in bad.columns if bad[c].dtype == object})
        uri = store.put_parquet(f"quarantine/model={model_name}/inference/{stamp}.parquet", bad)
    if len(kept) < min_rows and not len(bad):
        raise WindowTooSmall(f"window too small: {len(kept)} requests, policy needs at least {min_rows}")
    if len(kept) < min_rows:
        raise RefitError(
            f"window rejected: {len(kept)} usable rows of {len(frame)}, policy needs at least {min_rows}"
            + (f" ({len(bad)} quarantined at {uri})" if uri else "")
        )
    reasons = bad["reason"].value_counts().to_dict() if len(bad) else {}
    return Validated(kept, len(frame), len(bad), reasons, uri)


@cache
def _validate_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from tasks.retry import RETRY

    return task(name="validate-window", cache_policy=NO_CACHE, **RETRY)(_validate_window)


def __getattr__(name: str):
    """``validate_window``, the Prefect task, is built on first use: the row checks that ``refit drift`` uses
    never import Prefect (0.8 s of a 5 s check on 2 cores)."""
    if name == "validate_window":
        return _validate_task()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
