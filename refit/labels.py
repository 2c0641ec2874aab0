"""Labels in: delayed ground truth from a team's labelling process, checked before anything trains on it.

Two ways in, one set of rules: ``refit labels import FILE`` and the server's
``POST /feedback``. A row is either

- ``request_id, label``: the label of a request the model answered (found in
  the request log, flushed or still buffered in the server), or
- ``text, label``: an example that was never served.

Quarantined, with the reason, and counted: an unknown request id, an empty
label, a request id given twice in the batch or already labelled, a row
with neither a request id nor a text. A label the model does not know is
accepted: the update's new-label policy decides on it. Accepted plus
quarantined always equals the rows given.

Layout::

    labels/model=<name>/date=YYYY-MM-DD/part-*.parquet      request_id, label, source (delayed feedback)
    examples/model=<name>/date=YYYY-MM-DD/part-*.parquet    text, label, source, timestamp (never served)
    quarantine/model=<name>/labels/*.parquet                every refused row, with its reason

An update reads only the partitions written since its window began.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import pandas as pd

from refit import requestlog
from refit.errors import RefitError
from refit.store import ObjectStore

LOOKBACK_DAYS = 35  # how far back a labelled request id is looked for in the request log
EXAMPLE_COLUMNS = ["text", "label", "source", "timestamp"]


@dataclass(frozen=True)
class LabelImport:
    rows: int
    accepted: int
    quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    uris: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"accepted": self.accepted, "quarantined": self.quarantined, "reasons": self.reasons,
                "rows": self.rows}


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value)) or not str(value).strip()


def served_ids(store: ObjectStore, model_name: str, days: int = LOOKBACK_DAYS) -> set[str]:
    """Request ids in the flushed request log of the last ``days`` days (only the id column is kept)."""
    end = datetime.now(timezone.utc)
    served = requestlog.read_inference(store, model_name, end - timedelta(days=days), end + timedelta(minutes=1))
    return set(served["request_id"].astype(str)) if len(served) else set()


def labelled_ids(store: ObjectStore, model_name: str, days: int = LOOKBACK_DAYS) -> set[str]:
    since = (datetime.now(timezone.utc) - timedelta(days=days)).date()
    labels = requestlog.read_labels(store, model_name, since=since)
    return set(labels["request_id"].astype(str)) if len(labels) else set()


def import_labels(store: ObjectStore, model_name: str, rows: pd.DataFrame, *, source: str,
                  buffered_ids: Iterable[str] = (), known_ids: set[str] | None = None) -> LabelImport:
    """Check a batch of labels, write what passes, quarantine the rest with reasons.

    Args:
        rows: columns ``label`` and ``request_id`` and/or ``text``.
        source: recorded on every row (``feedback``, ``import:<file>``).
        buffered_ids: request ids the calling server answered but has not flushed yet.
        known_ids: request ids known to be served (default: read from the request log).

    Raises:
        RefitError: the batch has no ``label`` column, or neither ``request_id`` nor ``text``.
    """
    if "label" not in rows.columns:
        raise RefitError(f"labels need a 'label' column (columns: {', '.join(map(str, rows.columns)) or 'none'})")
    if "request_id" not in rows.columns and "text" not in rows.columns:
        raise RefitError("labels need a 'request_id' column (labels of served requests) or a 'text' column "
                         "(examples never served)")
    frame = rows.reset_index(drop=True).copy()
    for column in ("request_id", "text"):
        if column not in frame.columns:
            frame[column] = None
    reason = pd.Series("", index=frame.index, dtype=object)

    def mark(mask, why: str) -> None:
        reason[mask & (reason == "")] = why

    has_id = ~frame["request_id"].map(_blank)
    has_text = ~frame["text"].map(_blank)
    mark(frame["label"].map(_blank), "label is empty")
    mark(~has_id & ~has_text, "neither request_id nor text")
    ids = frame["request_id"].where(has_id).astype(object).map(lambda v: None if _blank(v) else str(v).strip())
    if has_id.any():
        buffered = set(map(str, buffered_ids))
        # The request log is read only for ids the caller's buffer does not hold (a /feedback call for requests
        # the server just answered reads nothing).
        looked_up = set(ids[has_id].dropna()) - buffered
        served = buffered | (known_ids if known_ids is not None else
                             served_ids(store, model_name) if looked_up else set())
        mark(has_id & ~ids.isin(served), "unknown request_id (not in the request log)")
        mark(has_id & ids.duplicated(keep="first"), "duplicate request_id in this batch")
        mark(has_id & ids.isin(labelled_ids(store, model_name)), "request_id already labelled")
    texts = frame["text"].where(~has_id).map(lambda v: None if _blank(v) else str(v).strip().lower())
    mark(~has_id & has_text & texts.duplicated(keep="first"), "duplicate text in this batch")

    ok = reason == ""
    now = datetime.now(timezone.utc)
    uris: list[str] = []
    feedback = frame[ok & has_id]
    if len(feedback):
        uris.append(requestlog.write_labels(store, model_name, pd.DataFrame({
            "request_id": ids[feedback.index].to_numpy(), "label": feedback["label"].astype(str).str.strip(),
            "source": source})))
    examples = frame[ok & ~has_id]
    if len(examples):
        uris.append(write_examples(store, model_name, pd.DataFrame({
            "text": examples["text"].astype(str), "label": examples["label"].astype(str).str.strip(),
            "source": source, "timestamp": pd.Timestamp(now)})))
    bad = frame[~ok]
    if len(bad):
        stamp = f"{now.strftime('%Y-%m-%dT%H%M%S.%f')}-{uuid.uuid4().hex[:8]}"
        uris.append(store.put_parquet(f"quarantine/model={model_name}/labels/{stamp}.parquet",
                                      bad.astype(str).assign(reason=reason[~ok], source=source)))
    return LabelImport(len(frame), int(ok.sum()), int((~ok).sum()),
                       {k: int(v) for k, v in reason[~ok].value_counts().items()}, uris)


def write_examples(store: ObjectStore, model_name: str, rows: pd.DataFrame) -> str:
    day = datetime.now(timezone.utc).date()
    stamp = int(datetime.now(timezone.utc).timestamp() * 1000)
    return store.put_parquet(f"examples/model={model_name}/date={day.isoformat()}/part-{stamp}-"
                             f"{uuid.uuid4().hex[:8]}.parquet", rows[EXAMPLE_COLUMNS])


def read_examples(store: ObjectStore, model_name: str, start: datetime, end: datetime) -> pd.DataFrame:
    """Examples imported in ``[start, end)`` (text, label, timestamp), reading only their date partitions."""
    frames = [store.read_parquet_prefix(f"examples/model={model_name}/date={day.isoformat()}/")
              for day in _days(start.date(), end.date())]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=EXAMPLE_COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    ts = pd.to_datetime(frame["timestamp"], utc=True)
    return frame[(ts >= start) & (ts < end)].reset_index(drop=True)


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def check_source(uri: str, allowed: list[str] | None) -> None:
    """Refuse a labelled file outside ``allowed`` (``REFIT_LABEL_SOURCES``): local directories, ``s3://`` prefixes.

    A local path is compared after resolving links and ``..``, so it cannot
    step out of an allowed directory; ``file://`` URIs are local paths.

    Raises:
        RefitError: one line naming the setting and what it allows.
    """
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    if allowed is None:
        return
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        ok = any(entry.startswith("s3://") and uri.startswith(entry.rstrip("/") + "/") for entry in allowed)
    else:
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else uri).expanduser().resolve()
        ok = any(not entry.startswith("s3://") and path.is_relative_to(Path(entry).expanduser().resolve())
                 for entry in allowed)
    if not ok:
        raise RefitError(f"labelled file {uri} is outside REFIT_LABEL_SOURCES ({', '.join(allowed)})")
