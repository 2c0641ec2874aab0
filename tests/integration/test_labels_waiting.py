"""Labels of requests not visible yet wait in the store and are joined once their request is flushed; none is lost.

On both stores (S3: the moto server). Rows in = kept + waiting + quarantined,
at every call and over the calls. The request log is read only where a
label's request can be: the day its id names, its request_id column.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from refit import requestlog
from refit.labels import (ALREADY_WAITING, LEASE_SECONDS, NEVER_SEEN, import_labels, read_pending, resolve_pending,
                          served_ids)

MODEL = "support"


def log(store, ids: list[str], when: datetime) -> None:
    requestlog.write_inference(store, MODEL, pd.DataFrame({
        "request_id": ids, "timestamp": [when] * len(ids), "text": [f"text of {i}" for i in ids],
        "predicted_label": "balance", "confidence": 0.9, "model_version": "1"}))


def ids_at(when: datetime, n: int) -> list[str]:
    return [requestlog.new_request_id(when) for _ in range(n)]


def batch(ids: list[str], label: str = "balance") -> pd.DataFrame:
    return pd.DataFrame({"request_id": ids, "label": label})


def test_a_request_id_names_its_day_and_only_that_day_is_read(tmp_path):
    from refit.store import LocalStore

    store = LocalStore(tmp_path / "store")
    now = datetime.now(timezone.utc)
    yesterday = now - timedelta(days=1)
    rid = requestlog.new_request_id(yesterday)
    assert requestlog.request_day(rid) == yesterday.date() and uuid.UUID(rid).version == 7
    assert requestlog.request_day(uuid.uuid4().hex) is None and requestlog.request_day("r1") is None
    assert requestlog.request_day("ffffffffffff7fff8fffffffffffffff") is None  # past the year 9999: not ours
    # A row filed under a day its id does not name is not found: the lookup reads the named day only.
    misplaced = requestlog.new_request_id(now - timedelta(days=3))
    log(store, [rid, misplaced], yesterday)
    log(store, ["opaque-id"], now - timedelta(days=20))  # an id of another form is looked for on every day
    assert served_ids(store, MODEL, [rid, misplaced, "opaque-id", "absent"], now) == {rid, "opaque-id"}


def test_labels_for_another_replicas_buffered_requests_wait_and_are_joined_once_it_flushes(store):
    now = datetime.now(timezone.utc)
    flushed, buffered = ids_at(now - timedelta(hours=2), 3), ids_at(now - timedelta(minutes=1), 4)
    log(store, flushed, now - timedelta(hours=2))
    first = import_labels(store, MODEL, batch(flushed + buffered), source="feedback", max_text_chars=2000)
    assert (first.accepted, first.waiting, first.quarantined) == (3, 4, 0)
    assert set(read_pending(store, MODEL)["request_id"]) == set(buffered)
    assert requestlog.read_labels(store, MODEL)["request_id"].tolist() == flushed  # waiting labels are not labels

    again = import_labels(store, MODEL, batch(buffered[:1], "transfer"), source="feedback", max_text_chars=2000)
    assert again.reasons == {ALREADY_WAITING: 1} and again.earlier.waiting == 4  # still not flushed: still waiting

    log(store, buffered, now - timedelta(minutes=1))  # the other replica flushes
    later = import_labels(store, MODEL, batch(ids_at(now, 2)), source="feedback", max_text_chars=2000)
    assert (later.earlier.kept, later.earlier.waiting, later.earlier.quarantined) == (4, 0, 0)
    assert later.waiting == 2  # this call's own, not logged anywhere yet
    labels = requestlog.read_labels(store, MODEL)
    assert sorted(labels["request_id"]) == sorted(flushed + buffered) and not labels["request_id"].duplicated().any()
    assert len(read_pending(store, MODEL)) == 2


def test_a_label_whose_request_never_appears_goes_to_quarantine_after_the_lookback(store):
    now = datetime.now(timezone.utc)
    ghost, opaque = ids_at(now, 1), ["never-served"]
    result = import_labels(store, MODEL, batch(ghost + opaque), source="import:x.csv", max_text_chars=2000)
    assert result.waiting == 2
    assert resolve_pending(store, MODEL, now=now + timedelta(days=30)).waiting == 2  # still inside the lookback
    late = resolve_pending(store, MODEL, now=now + timedelta(days=36))
    assert (late.kept, late.quarantined, late.waiting) == (0, 2, 0) and late.reasons == {NEVER_SEEN: 2}
    quarantined = store.read_parquet_prefix(f"quarantine/model={MODEL}/labels/")
    assert sorted(quarantined["request_id"]) == sorted(ghost + opaque) and set(quarantined["reason"]) == {NEVER_SEEN}
    assert len(read_pending(store, MODEL)) == 0

    old = requestlog.new_request_id(now - timedelta(days=40))
    refused = import_labels(store, MODEL, batch([old]), source="feedback", max_text_chars=2000)
    assert refused.quarantined == 1 and "beyond the 35-day lookback" in next(iter(refused.reasons))


def test_a_settler_stopped_after_writing_labels_is_finished_without_writing_twice(store, monkeypatch, tmp_path):
    from refit.faults import FaultInjected

    now = datetime.now(timezone.utc)
    waiting = ids_at(now, 3)
    import_labels(store, MODEL, batch(waiting), source="feedback", max_text_chars=2000)
    import_labels(store, MODEL, batch(ids_at(now, 1)), source="feedback", max_text_chars=2000)  # a second part
    log(store, waiting, now)
    monkeypatch.setenv("REFIT_FAULTS", "labels.settle.written=raise")
    with pytest.raises(FaultInjected):
        resolve_pending(store, MODEL)
    monkeypatch.delenv("REFIT_FAULTS")
    assert len(read_pending(store, MODEL)) == 4  # nothing was deleted: the labels written are also still waiting
    done = resolve_pending(store, MODEL)
    assert (done.kept, done.quarantined, done.waiting) == (3, 0, 1)
    labels = requestlog.read_labels(store, MODEL)
    assert sorted(labels["request_id"]) == sorted(waiting) and len(labels) == 3


def test_one_settler_at_a_time_and_a_dead_ones_lease_is_taken_over(store):
    now = datetime.now(timezone.utc)
    rid = ids_at(now, 1)
    import_labels(store, MODEL, batch(rid), source="feedback", max_text_chars=2000)
    log(store, rid, now)
    lease = f"labels/model={MODEL}/pending.lease"
    store.put_bytes(lease, f"{now.isoformat()} other-settler".encode())
    busy = resolve_pending(store, MODEL, now=now + timedelta(seconds=1))
    assert busy.busy and busy.waiting == 1 and requestlog.read_labels(store, MODEL).empty
    taken = resolve_pending(store, MODEL, now=now + timedelta(seconds=LEASE_SECONDS + 1))
    assert (taken.busy, taken.kept) == (False, 1)
    assert lease not in store.list(f"labels/model={MODEL}/")  # released


def test_long_texts_and_labels_are_quarantined_with_the_limit_named(store):
    rows = pd.DataFrame({"text": ["x" * 2001, "fine text", "another fine one"], "label": ["a", "b" * 201, "c"]})
    result = import_labels(store, MODEL, rows, source="feedback", max_text_chars=2000)
    assert (result.accepted, result.quarantined) == (1, 2)
    assert result.reasons == {"text is 2,001 characters; the limit is 2,000": 1, "label is over 200 characters": 1}
