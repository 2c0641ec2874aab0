"""The request log: what serving writes and what the monitor reads.

Layout in the object store (S3 or the local directory)::

    inference/model=<name>/date=YYYY-MM-DD/part-<unix ms>-<uuid8>.parquet
    labels/model=<name>/date=YYYY-MM-DD/part-<unix ms>-<uuid8>.parquet

An inference row is one served request: ``request_id``, ``timestamp`` (UTC),
``text``, ``predicted_label``, ``confidence``, ``model_version``, ``served_by``. A label row
is delayed ground truth: ``request_id``, ``label``, ``source``.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone

import pandas as pd

from refit.store import ObjectStore

# served_by: the cascade tier that answered ("student" or "champion"); rows written without it were the champion's.
INFERENCE_COLUMNS = ["request_id", "timestamp", "text", "predicted_label", "confidence", "model_version", "served_by"]
LABEL_COLUMNS = ["request_id", "label", "source"]


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


def _days(start: datetime, end: datetime) -> list[date]:
    first, last = start.date(), end.date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def read_inference(store: ObjectStore, model_name: str, start: datetime, end: datetime) -> pd.DataFrame:
    """Requests served in ``[start, end)``, reading only the date partitions involved."""
    frames = [store.read_parquet_prefix(f"inference/model={model_name}/date={day.isoformat()}/")
              for day in _days(start, end)]
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
    what arrived since its window began, not the whole history.
    """
    if since is None:
        frames = [store.read_parquet_prefix(f"labels/model={model_name}/")]
    else:
        today = datetime.now(timezone.utc).date()
        frames = [store.read_parquet_prefix(f"labels/model={model_name}/date={day.isoformat()}/")
                  for day in [since + timedelta(days=i) for i in range(max(0, (today - since).days) + 1)]]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LABEL_COLUMNS)


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
