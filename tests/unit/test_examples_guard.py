"""Examples (text, label, never served) get the label-mix guard that served rows get, when an update assembles them;
labels that waited for their request are joined before the update reads its labels."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from refit import requestlog
from refit.errors import RefitError
from refit.labels import import_labels, read_pending
from refit.store import LocalStore
from tasks.ingest import labelled_window

INTENTS = ["balance", "transfer", "freeze", "pin", "bill"]


def traffic(store, start: datetime, n: int = 100) -> list[str]:
    """``n`` served requests, their predictions spread evenly over the intents; returns their ids."""
    times = [start + timedelta(minutes=i) for i in range(n)]
    ids = [requestlog.new_request_id(t) for t in times]
    requestlog.write_inference(store, "m", pd.DataFrame({
        "request_id": ids, "timestamp": times, "text": [f"request {i}" for i in range(n)],
        "predicted_label": [INTENTS[i % len(INTENTS)] for i in range(n)], "confidence": 0.9, "model_version": "1"}))
    return ids


def examples(labels: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"example {i} of {label}" for i, label in enumerate(labels)], "label": labels})


def window(store, start: datetime):
    return labelled_window.fn(store, "m", start, start + timedelta(hours=3), known_labels=INTENTS,
                              max_label_mix_shift=0.5, min_rows_for_mix=20)


def test_examples_all_of_one_intent_are_refused_and_quarantined_whole(tmp_path):
    store = LocalStore(tmp_path / "store")
    start = datetime.now(timezone.utc) - timedelta(hours=2)
    traffic(store, start)
    import_labels(store, "m", examples(["transfer"] * 40), source="feedback", max_text_chars=2000)
    with pytest.raises(RefitError, match="example batch rejected: label mix moved"):
        window(store, start)
    [key] = [k for k in store.list("quarantine/model=m/labels/") if k.endswith("-examples.parquet")]
    assert len(store.get_parquet(key)) == 40 and store.get_parquet(key)["reason"].str.contains("above").all()


def test_examples_that_look_like_the_traffic_pass_with_the_labels_that_waited(tmp_path):
    store = LocalStore(tmp_path / "store")
    start = datetime.now(timezone.utc) - timedelta(hours=2)
    # Labels arrive before another replica flushed their requests: they wait.
    times = [start + timedelta(minutes=100 + i) for i in range(5)]
    late = [requestlog.new_request_id(t) for t in times]
    waited = import_labels(store, "m", pd.DataFrame({"request_id": late, "label": "pin"}), source="feedback",
                           max_text_chars=2000)
    assert waited.waiting == 5
    traffic(store, start)
    requestlog.write_inference(store, "m", pd.DataFrame({
        "request_id": late, "timestamp": times, "text": [f"late {i}" for i in range(5)], "predicted_label": "pin",
        "confidence": 0.9, "model_version": "1"}))
    import_labels(store, "m", examples([INTENTS[i % len(INTENTS)] for i in range(40)]), source="feedback",
                  max_text_chars=2000)
    rows = window(store, start)
    assert len(rows) == 5 + 40 and len(read_pending(store, "m")) == 0
