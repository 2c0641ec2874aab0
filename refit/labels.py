"""Labels in: delayed ground truth from a team's labelling process, checked before anything trains on it.

Two ways in, one set of rules: ``refit labels import FILE`` and the server's
``POST /feedback``. A row is either

- ``request_id, label``: the label of a request the model answered (found in
  the request log, flushed or still buffered in the server), or
- ``text, label``: an example that was never served.

Every row ends in exactly one of three places, so rows in = kept + waiting
+ quarantined:

- kept: the label of a request found in the request log (or in the calling
  server's buffer), or an example;
- waiting: the label of a request not visible yet. With several serving
  replicas, a request answered by another one sits in its buffer until that
  one flushes, so its label waits in ``labels/model=<name>/pending/`` and is
  joined by a later import or ``/feedback`` call, or when an update assembles
  its labels (``resolve_pending``), whichever comes first;
- quarantined, with the reason: an empty or over-long label, a text over
  the length cap, a request id given twice in the batch or already labelled
  (or already waiting), a row with neither a request id nor a text, a
  request id older than the lookback, and a waiting label whose request
  never appeared in the request log within the lookback.

A label the model does not know is accepted: the update's new-label policy
decides on it. The label-mix guard that served rows get is applied to
examples too, when an update assembles them (``tasks.ingest``).

Layout::

    labels/model=<name>/date=YYYY-MM-DD/part-*.parquet      request_id, label, source (delayed feedback)
    labels/model=<name>/pending/part-*.parquet              request_id, label, source, received_at, label_id
    examples/model=<name>/date=YYYY-MM-DD/part-*.parquet    text, label, source, timestamp (never served)
    quarantine/model=<name>/labels/*.parquet                every refused row, with its reason

An update reads only the partitions written since its window began. A label
join reads only the ``request_id`` column of the request-log days its ids can
be in (``refit.requestlog.served_among``), and only ``request_id, label`` of
the label partitions since the earliest of those days.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import pandas as pd

from refit import faults, requestlog
from refit.data import text_key
from refit.errors import RefitError
from refit.store import ObjectStore

LOOKBACK_DAYS = 35  # how far back a labelled request id is looked for in the request log, and how long a label waits
EXAMPLE_COLUMNS = ["text", "label", "source", "timestamp"]
PENDING_COLUMNS = ["request_id", "label", "source", "received_at", "label_id"]
MAX_TEXT_CHARS = 2000  # the default of REFIT_SERVE_MAX_TEXT_CHARS: a text the server would refuse is not trained on
MAX_LABEL_CHARS = 200
LEASE_SECONDS = 120.0  # a resolver that died holding the pending area's lease is taken over after this long
NEVER_SEEN = f"unknown request_id (not in the request log within {LOOKBACK_DAYS} days)"
ALREADY = "request_id already labelled"
ALREADY_WAITING = "request_id already labelled (that label waits for the request log)"


@dataclass(frozen=True)
class Resolved:
    """What became of labels that waited for their request: kept, quarantined, or still waiting.

    ``busy``: another caller held the pending area, so nothing was settled this time.
    """

    kept: int = 0
    quarantined: int = 0
    waiting: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    busy: bool = False
    uris: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"kept": self.kept, "quarantined": self.quarantined, "waiting": self.waiting, "reasons": self.reasons,
                "busy": self.busy}


@dataclass(frozen=True)
class LabelImport:
    rows: int
    accepted: int
    quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    uris: list[str] = field(default_factory=list)
    waiting: int = 0
    earlier: Resolved = field(default_factory=Resolved)  # labels that waited from earlier calls, settled in this one

    def to_dict(self) -> dict:
        return {"accepted": self.accepted, "waiting": self.waiting, "quarantined": self.quarantined,
                "reasons": self.reasons, "rows": self.rows, "earlier_waiting": self.earlier.to_dict()}


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value)) or not str(value).strip()


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(timezone.utc)


def _stamp(now: datetime) -> str:
    return f"{now.strftime('%Y-%m-%dT%H%M%S.%f')}-{uuid.uuid4().hex[:8]}"


def _lookback(now: datetime) -> tuple[date, date]:
    """The request-log days a label may point into: the lookback, and tomorrow (a replica's clock ahead)."""
    return (now - timedelta(days=LOOKBACK_DAYS)).date(), (now + timedelta(days=1)).date()


def served_ids(store: ObjectStore, model_name: str, ids: Iterable[str], now: datetime | None = None) -> set[str]:
    """Those of ``ids`` in the flushed request log of the lookback (only their days' ``request_id`` columns read)."""
    first, last = _lookback(_now(now))
    return requestlog.served_among(store, model_name, ids, first, last)


def _labels_since(ids: Iterable[str], now: datetime) -> date:
    """The first label partition that can hold a label of ``ids``: a label arrives after its request."""
    first = _lookback(now)[0]
    days = [requestlog.request_day(i) for i in ids]
    if not days or any(d is None for d in days):
        return first
    return max(first, min(days))


def pending_prefix(model_name: str) -> str:
    return f"labels/model={model_name}/pending/"


def _pending_keys(store: ObjectStore, model_name: str) -> list[str]:
    return [k for k in store.list(pending_prefix(model_name)) if k.endswith(".parquet")]


def read_pending(store: ObjectStore, model_name: str, keys: list[str] | None = None) -> pd.DataFrame:
    """Labels waiting for their request (a row written twice by a resolver that stopped midway counts once)."""
    frames = []
    for key in _pending_keys(store, model_name) if keys is None else keys:
        try:
            frames.append(store.get_parquet(key))
        except KeyError:  # settled and deleted by another caller since the listing
            continue
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in PENDING_COLUMNS})
    return pd.concat(frames, ignore_index=True).drop_duplicates("label_id").reset_index(drop=True)


@contextmanager
def _lease(store: ObjectStore, model_name: str, now: datetime) -> Iterator[bool]:
    """Hold the pending area alone (True) or not at all (False): two settlers would write a label twice.

    A lease whose holder stopped without releasing it is taken over once it
    is ``LEASE_SECONDS`` old (a conditional write, so only one taker wins).
    """
    key = f"labels/model={model_name}/pending.lease"
    token = f"{now.isoformat()} {uuid.uuid4().hex}".encode()
    held = store.create(key, token)
    if not held:
        try:
            data, tag = store.get_versioned(key)
            since = datetime.fromisoformat(data.decode().split(" ", 1)[0])
            held = (now - since).total_seconds() > LEASE_SECONDS and store.replace_if(key, token, tag)
        except KeyError:  # released meanwhile
            held = store.create(key, token)
        except (ValueError, UnicodeDecodeError):  # not a lease this code wrote: leave it to its writer's expiry
            held = False
    try:
        yield held
    finally:
        if held:
            try:
                data, tag = store.get_versioned(key)
                if data == token:
                    store.delete_if(key, tag)
            except KeyError:
                pass


def _settle(store: ObjectStore, model_name: str, keys: list[str], waiting: pd.DataFrame, visible: set[str],
            labelled: pd.DataFrame, now: datetime) -> Resolved:
    """Join waiting labels whose request is now visible; quarantine those that can no longer appear.

    Writes go labels first, then quarantine, then what still waits, and only
    then are the parts read deleted: a settler stopped midway loses nothing,
    and its successor counts a label it finds already written (same request
    id and label) as kept, not twice.
    """
    if not len(waiting):
        return Resolved()
    rid = waiting["request_id"].astype(str)
    pairs = set(zip(labelled["request_id"], labelled["label"]))
    found = rid.isin(visible)
    written = found & pd.Series([(r, str(lab)) in pairs for r, lab in zip(rid, waiting["label"])], index=rid.index)
    other = found & ~written & (rid.isin(set(labelled["request_id"])) | rid.where(found).duplicated(keep="first"))
    kept = found & ~written & ~other
    days = rid.map(requestlog.request_day)
    first = _lookback(now)[0]
    received = pd.to_datetime(waiting["received_at"], utc=True)
    too_old = days.map(lambda d: d is not None and d < first)
    expired = ~found & ((received < now - timedelta(days=LOOKBACK_DAYS)) | too_old)
    still = ~found & ~expired
    reason = pd.Series("", index=waiting.index, dtype=object)
    reason[other] = ALREADY
    reason[expired] = NEVER_SEEN
    uris = []
    if kept.any():
        uris.append(requestlog.write_labels(store, model_name, waiting[kept].assign(request_id=rid[kept]),
                                            day=now.date()))
    faults.point("labels.settle.written")
    bad = waiting[other | expired]
    if len(bad):
        digest = hashlib.sha1("".join(sorted(bad["label_id"].astype(str))).encode()).hexdigest()[:16]
        uris.append(store.put_parquet(f"quarantine/model={model_name}/labels/pending-{digest}.parquet",
                                      bad.astype(str).assign(reason=reason[other | expired])))
    if still.any() and (len(keys) > 1 or (~still).any()):  # one part with nothing settled stays as it is
        _write_pending(store, model_name, waiting[still], now)
    if len(keys) > 1 or (~still).any():
        for key in keys:
            store.delete(key)
    return Resolved(int(kept.sum() + written.sum()), int((other | expired).sum()), int(still.sum()),
                    {k: int(v) for k, v in reason[other | expired].value_counts().items()}, uris=uris)


def _write_pending(store: ObjectStore, model_name: str, rows: pd.DataFrame, now: datetime) -> str:
    key = pending_prefix(model_name) + f"part-{int(now.timestamp() * 1000)}-{uuid.uuid4().hex[:8]}.parquet"
    return store.put_parquet(key, rows[PENDING_COLUMNS].reset_index(drop=True))


def resolve_pending(store: ObjectStore, model_name: str, buffered_ids: Iterable[str] = (),
                    now: datetime | None = None) -> Resolved:
    """Join the labels that waited for their request, now that it may be in the request log.

    What ``import_labels`` does for earlier calls' waiting labels, alone:
    for an update about to read its labels, or a check that a replica's
    flush let every waiting label in. ``buffered_ids``: requests the caller
    answered but has not flushed.
    """
    now = _now(now)
    keys = _pending_keys(store, model_name)
    if not keys:
        return Resolved()
    with _lease(store, model_name, now) as held:
        waiting = read_pending(store, model_name, keys)
        if not held:
            return Resolved(waiting=len(waiting), busy=True)
        buffered = set(map(str, buffered_ids))
        ids = set(waiting["request_id"].astype(str))
        visible = buffered | served_ids(store, model_name, ids - buffered, now)
        labelled = requestlog.label_pairs(store, model_name, _labels_since(ids, now), now.date(), ids)
        return _settle(store, model_name, keys, waiting, visible, labelled, now)


def _row_checks(rows: pd.DataFrame, max_text_chars: int, now: datetime):
    """Checks that need no store: the frame, each row's first reason ("" if none), the ids and which rows have one."""
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

    def mark(mask, why) -> None:
        mask = mask & (reason == "")
        reason[mask] = why if isinstance(why, str) else why[mask]

    has_id = ~frame["request_id"].map(_blank)
    has_text = ~frame["text"].map(_blank)
    label_chars = frame["label"].map(lambda v: 0 if _blank(v) else len(str(v).strip()))
    mark(label_chars == 0, "label is empty")
    mark(label_chars > MAX_LABEL_CHARS, f"label is over {MAX_LABEL_CHARS} characters")
    mark(~has_id & ~has_text, "neither request_id nor text")
    text_chars = frame["text"].where(~has_id & has_text).map(lambda v: 0 if _blank(v) else len(str(v)))
    mark(text_chars > max_text_chars,
         text_chars.map(lambda n: f"text is {n:,} characters; the limit is {max_text_chars:,}"))
    texts = frame["text"].where(~has_id).map(lambda v: None if _blank(v) else text_key(v))
    mark(~has_id & has_text & texts.duplicated(keep="first"), "duplicate text in this batch")
    ids = frame["request_id"].where(has_id).astype(object).map(lambda v: None if _blank(v) else str(v).strip())
    first = _lookback(now)[0]
    days = ids.map(lambda v: requestlog.request_day(v) if v else None)
    mark(has_id & days.map(lambda d: d is not None and d < first),
         days.map(lambda d: f"request_id is from {d}, beyond the {LOOKBACK_DAYS}-day lookback"))
    mark(has_id & ids.duplicated(keep="first"), "duplicate request_id in this batch")
    return frame, reason, ids, has_id


def import_labels(store: ObjectStore, model_name: str, rows: pd.DataFrame, *, source: str,
                  buffered_ids: Iterable[str] = (), known_ids: set[str] | None = None,
                  max_text_chars: int | None = None, now: datetime | None = None) -> LabelImport:
    """Check a batch of labels: keep what passes, let labels of requests not visible yet wait, quarantine the rest.

    Labels that waited from earlier calls are settled first, in the same
    reads (``earlier`` in the result).

    Args:
        rows: columns ``label`` and ``request_id`` and/or ``text``.
        source: recorded on every row (``feedback``, ``import:<file>``).
        buffered_ids: request ids the calling server answered but has not flushed yet.
        known_ids: request ids known to be served (default: read from the request log).
        max_text_chars: longest example text kept (default ``REFIT_SERVE_MAX_TEXT_CHARS``).
        now: the time of the import (default: the clock).

    Raises:
        RefitError: the batch has no ``label`` column, or neither ``request_id`` nor ``text``.
    """
    now = _now(now)
    if max_text_chars is None:
        from refit.settings import Settings

        max_text_chars = Settings().serve_max_text_chars
    frame, reason, ids, has_id = _row_checks(rows, max_text_chars, now)
    buffered = set(map(str, buffered_ids))
    candidates = set(ids[has_id & (reason == "")])
    keys = _pending_keys(store, model_name)
    with _lease(store, model_name, now) if keys else _no_lease() as held:
        waiting = read_pending(store, model_name, keys) if keys else read_pending(store, model_name, [])
        looked_up = candidates | set(waiting["request_id"].astype(str))
        visible = buffered | (known_ids if known_ids is not None else
                              served_ids(store, model_name, looked_up - buffered, now) if looked_up - buffered else set())
        labelled = requestlog.label_pairs(store, model_name, _labels_since(looked_up, now) if looked_up else None,
                                              now.date(), looked_up)
        earlier = (_settle(store, model_name, keys, waiting, visible, labelled, now) if held
                   else Resolved(waiting=len(waiting), busy=bool(keys)))
    reason[has_id & (reason == "") & ids.isin(set(labelled["request_id"]))] = ALREADY
    reason[has_id & (reason == "") & ids.isin(set(waiting["request_id"].astype(str)))] = ALREADY_WAITING
    return _write_import(store, model_name, frame, reason, ids, has_id & ~ids.isin(visible), source, now, earlier)


@contextmanager
def _no_lease() -> Iterator[bool]:
    yield False


def _write_import(store: ObjectStore, model_name: str, frame: pd.DataFrame, reason: pd.Series, ids: pd.Series,
                  unseen: pd.Series, source: str, now: datetime, earlier: Resolved) -> LabelImport:
    """Write the batch's three outcomes: labels and examples kept, labels waiting, rows quarantined."""
    has_id = ~ids.isna()
    ok = reason == ""
    waits = ok & unseen
    kept = ok & ~waits
    uris: list[str] = []
    feedback = frame[kept & has_id]
    if len(feedback):
        uris.append(requestlog.write_labels(store, model_name, pd.DataFrame({
            "request_id": ids[feedback.index].to_numpy(), "label": feedback["label"].astype(str).str.strip(),
            "source": source}), day=now.date()))
    if waits.any():
        uris.append(_write_pending(store, model_name, pd.DataFrame({
            "request_id": ids[waits].to_numpy(), "label": frame["label"][waits].astype(str).str.strip(),
            "source": source, "received_at": pd.Timestamp(now),
            "label_id": [uuid.uuid4().hex for _ in range(int(waits.sum()))]}), now))
    examples = frame[kept & ~has_id]
    if len(examples):
        uris.append(write_examples(store, model_name, pd.DataFrame({
            "text": examples["text"].astype(str), "label": examples["label"].astype(str).str.strip(),
            "source": source, "timestamp": pd.Timestamp(now)}), now))
    bad = frame[~ok]
    if len(bad):
        uris.append(store.put_parquet(f"quarantine/model={model_name}/labels/{_stamp(now)}.parquet",
                                      bad.astype(str).assign(reason=reason[~ok], source=source)))
    return LabelImport(len(frame), int(kept.sum()), int((~ok).sum()),
                       {k: int(v) for k, v in reason[~ok].value_counts().items()}, uris, int(waits.sum()), earlier)

def write_examples(store: ObjectStore, model_name: str, rows: pd.DataFrame, now: datetime | None = None) -> str:
    now = _now(now)
    day, stamp = now.date(), int(now.timestamp() * 1000)
    return store.put_parquet(f"examples/model={model_name}/date={day.isoformat()}/part-{stamp}-"
                             f"{uuid.uuid4().hex[:8]}.parquet", rows[EXAMPLE_COLUMNS])


def read_examples(store: ObjectStore, model_name: str, start: datetime, end: datetime) -> pd.DataFrame:
    """Examples imported in ``[start, end)`` (text, label, timestamp), reading only their date partitions."""
    frames = [store.read_parquet_prefix(f"examples/model={model_name}/date={day.isoformat()}/")
              for day in requestlog.calendar_days(start.date(), end.date())]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=EXAMPLE_COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    ts = pd.to_datetime(frame["timestamp"], utc=True)
    return frame[(ts >= start) & (ts < end)].reset_index(drop=True)


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
