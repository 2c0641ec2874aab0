"""The request log: what serving writes and what the monitor reads.

Layout in the object store (S3 or the local directory)::

    inference/model=<name>/date=YYYY-MM-DD/part-<unix ms>-<uuid8>.parquet
    labels/model=<name>/date=YYYY-MM-DD/part-<unix ms>-<uuid8>.parquet

An inference row is one served request: ``request_id``, ``timestamp`` (UTC),
``text``, ``predicted_label``, ``confidence``, ``model_version``, ``served_by``. A label row
is delayed ground truth: ``request_id``, ``label``, ``source``.

A request id is a UUID in the version 7 layout: its first 48 bits are the
request's time in Unix milliseconds, the same instant as its ``timestamp``.
So the one date partition that can hold a request is known from its id
alone, and a label join reads that day's ``request_id`` column, not a month
of texts. Ids of any other form (older servers, other writers) are still
found: they are looked for in every day of the lookback.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterable
from datetime import date, datetime, timedelta, timezone

import pandas as pd

from refit.store import LocalStore, ObjectStore

# served_by: the cascade tier that answered ("student" or "champion"); rows written without it were the champion's.
INFERENCE_COLUMNS = ["request_id", "timestamp", "text", "predicted_label", "confidence", "model_version", "served_by"]
LABEL_COLUMNS = ["request_id", "label", "source"]


def new_request_id(when: datetime) -> str:
    """A request id that carries ``when`` (UTC, to the millisecond): 32 hex digits, UUID version 7 layout."""
    ms = int(when.timestamp() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")  # 80 random bits: 12 + 62 used
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64 | 0b10 << 62 | rand & (2**62 - 1)
    return f"{value:032x}"


_HEX = frozenset("0123456789abcdef")


def request_day(request_id: str) -> date | None:
    """The UTC day a request id of ``new_request_id``'s layout was answered; None for an id of another form."""
    if len(request_id) != 32 or request_id[12] != "7" or request_id[16] not in "89ab" or not _HEX.issuperset(request_id):
        return None
    try:
        return datetime.fromtimestamp(int(request_id[:12], 16) / 1000, timezone.utc).date()
    except (ValueError, OverflowError, OSError):  # a time past the year 9999: not an id this code made
        return None


def _part_key(kind: str, model_name: str, day: date) -> str:
    stamp = int(datetime.now(timezone.utc).timestamp() * 1000)
    return f"{kind}/model={model_name}/date={day.isoformat()}/part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"


def write_inference(store: ObjectStore, model_name: str, rows: pd.DataFrame) -> list[str]:
    """Append served requests, one part per day they span. Returns the URIs."""
    if "served_by" not in rows.columns:
        rows = rows.assign(served_by="champion")
    rows = rows[INFERENCE_COLUMNS]
    days = pd.to_datetime(rows["timestamp"], utc=True).dt.date
    return [store.put_parquet(_part_key("inference", model_name, day), part) for day, part in rows.groupby(days)]


def write_labels(store: ObjectStore, model_name: str, rows: pd.DataFrame, day: date | None = None) -> str:
    day = day or datetime.now(timezone.utc).date()
    return store.put_parquet(_part_key("labels", model_name, day), rows[LABEL_COLUMNS])


def calendar_days(first: date, last: date) -> list[date]:
    """Every day from ``first`` to ``last``, both included (none if ``last`` is earlier): a span's date partitions."""
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def read_inference(store: ObjectStore, model_name: str, start: datetime, end: datetime) -> pd.DataFrame:
    """Requests served in ``[start, end)``, reading only the date partitions involved."""
    frames = [store.read_parquet_prefix(f"inference/model={model_name}/date={day.isoformat()}/")
              for day in calendar_days(start.date(), end.date())]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=INFERENCE_COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    if "timestamp" not in frame.columns:
        return frame
    # A row whose timestamp is not a time (another writer's part) is kept, not dropped: validation quarantines it.
    ts = pd.to_datetime(frame["timestamp"], utc=True, errors="coerce", format="mixed")
    return frame[ts.isna() | ((ts >= start) & (ts < end))].reset_index(drop=True)


def read_labels(store: ObjectStore, model_name: str, since: date | None = None) -> pd.DataFrame:
    """Label rows, all of them or only the date partitions written on ``since`` (UTC) or later.

    Labels are partitioned by the day they arrived, so an update reads only
    what arrived since its window began, not the whole history. Labels that
    wait for their request (``labels/model=<name>/pending/``) are not labels
    yet and are not read here.
    """
    if since is None:
        frames = [store.read_parquet_prefix(f"labels/model={model_name}/date=")]
    else:
        today = datetime.now(timezone.utc).date()
        frames = [store.read_parquet_prefix(f"labels/model={model_name}/date={day.isoformat()}/")
                  for day in calendar_days(since, max(since, today))]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LABEL_COLUMNS)


def _open_part(store: ObjectStore, key: str):
    """A Parquet part opened for reading some of its columns (a pyarrow ``ParquetFile``), or None if it is gone.

    A local store's file is opened in place, so only the pages read are read
    from disk; another store's object is fetched whole (the interface has no
    ranged read) and only what is asked for is decoded.
    """
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(store.root / key if isinstance(store, LocalStore) else io.BytesIO(store.get_bytes(key)))
    except (KeyError, FileNotFoundError):  # deleted between the listing and the read
        return None


def _columns(store: ObjectStore, key: str, columns: list[str]):
    """Only ``columns`` of one part (a pyarrow table), or None if the part is gone or lacks one of them."""
    part = _open_part(store, key) if key.endswith(".parquet") else None
    if part is None or not set(columns) <= set(part.schema_arrow.names):
        return None
    return part.read(columns=columns)


def _groups_holding(part, wanted: list[str]) -> list[int]:
    """The row groups of ``part`` whose ``request_id`` range holds one of ``wanted`` (sorted), by the footer's
    statistics: ids carry their time, so a part written in time order narrows each lookup to one group."""
    from bisect import bisect_left

    column = part.schema.names.index("request_id")
    groups = []
    for group in range(part.metadata.num_row_groups):
        stats = part.metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max or not isinstance(stats.min, str):
            groups.append(group)
            continue
        at = bisect_left(wanted, stats.min)
        if at < len(wanted) and wanted[at] <= stats.max:
            groups.append(group)
    return groups


def _ids_in_parts(store: ObjectStore, prefix: str, wanted: list[str]) -> set[str]:
    """Which of ``wanted`` (sorted) appear in the ``request_id`` column of the parts under ``prefix``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    value_set = pa.array(wanted, pa.string())
    found: set[str] = set()
    for key in store.list(prefix):
        part = _open_part(store, key) if key.endswith(".parquet") else None
        if part is None or "request_id" not in part.schema_arrow.names:
            continue
        groups = _groups_holding(part, wanted)
        if not groups:
            continue
        column = pc.cast(part.read_row_groups(groups, columns=["request_id"]).column(0), pa.string())
        found.update(pc.filter(column, pc.is_in(column, value_set=value_set)).to_pylist())
    return found


def served_among(store: ObjectStore, model_name: str, ids: Iterable[str], first: date, last: date) -> set[str]:
    """The ids in ``ids`` that are in the flushed request log between the days ``first`` and ``last``.

    Reads only the ``request_id`` column, only of the days that can hold the
    ids (the day an id names, ``request_day``; for an id that names none,
    every day from ``first`` to ``last``), and only the row groups whose id
    range can hold one.
    """
    by_day: dict[date, list[str]] = {}
    anywhere: list[str] = []
    for request_id in set(ids):
        day = request_day(request_id)
        if day is None:
            anywhere.append(request_id)
        elif first <= day <= last:
            by_day.setdefault(day, []).append(request_id)
    for day in calendar_days(first, last) if anywhere else ():
        by_day.setdefault(day, []).extend(anywhere)
    found: set[str] = set()
    for day, wanted in sorted(by_day.items()):
        found |= _ids_in_parts(store, f"inference/model={model_name}/date={day.isoformat()}/", sorted(wanted))
    return found


def label_pairs(store: ObjectStore, model_name: str, since: date | None, until: date | None = None,
                ids: Iterable[str] | None = None) -> pd.DataFrame:
    """``request_id`` and ``label`` of the labels that arrived from ``since`` to ``until`` (default today), only
    those two columns read, and with ``ids`` only the rows of those request ids. ``since`` None reads nothing.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    until = until or datetime.now(timezone.utc).date()
    value_set = pa.array(sorted(set(ids)), pa.string()) if ids is not None else None
    frames = []
    for day in calendar_days(since, max(since, until)) if since is not None else ():
        prefix = f"labels/model={model_name}/date={day.isoformat()}/"
        for key in store.list(prefix):
            table = _columns(store, key, ["request_id", "label"])
            if table is None or not table.num_rows:
                continue
            if value_set is not None:
                table = table.filter(pc.is_in(pc.cast(table.column(0), pa.string()), value_set=value_set))
            if table.num_rows:
                frames.append(table.to_pandas())
    if not frames:
        return pd.DataFrame({"request_id": pd.Series(dtype=object), "label": pd.Series(dtype=object)})
    return pd.concat(frames, ignore_index=True).astype({"request_id": str, "label": str})


def window_uri(store: ObjectStore, model_name: str, start: datetime, end: datetime) -> str:
    return f"{store.uri(f'inference/model={model_name}/')}?start={start.isoformat()}&end={end.isoformat()}"


MODEL_DATA_PREFIXES = ("inference", "labels", "examples", "reference", "evaluation", "quarantine")


def delete_model_data(store: ObjectStore, model_name: str) -> int:
    """Delete every object the loop keeps for one model (traffic, labels, references, golden suite, quarantine).

    For the demo only, whose traffic is simulated: a second run starts its
    story again instead of reading the first run's windows. Returns the
    number of objects deleted.
    """
    keys = [key for kind in MODEL_DATA_PREFIXES for key in store.list(f"{kind}/model={model_name}/")]
    for key in keys:
        store.delete(key)
    return len(keys)
