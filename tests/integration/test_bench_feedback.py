"""`refit bench feedback`'s core, small: a month of request log, the real server, every label joined or accounted for."""

from __future__ import annotations

import pandas as pd

from refit import requestlog
from refit.bench.feedback import MODEL, other_replica_fault, run_benchmark
from refit.store import LocalStore


def test_every_label_sent_is_joined_to_its_request_and_a_second_run_reuses_the_store(tmp_path, data_dir):
    home = tmp_path / "home"
    first = run_benchmark(home, data_dir, requests=20_000, days=30, calls=12, labels_per_call=100,
                          unlogged_per_call=5, flush_every=4)
    assert first["requests_logged"] == 20_000 and not first["store_reused"]
    assert first["labels_sent"] == 12 * 100
    assert (first["labels_kept"], first["labels_waiting"], first["labels_quarantined"]) == (1200, 0, 0)
    assert first["labels_lost"] == 0 and first["join_errors"] == 0
    assert first["answered"]["waiting"] == 11 * 5 == first["settled_later"]["kept"] == first["replica_rows_flushed"]

    store = LocalStore(home / "store")
    days = {key.split("/")[2] for key in store.list(f"inference/model={MODEL}/")}
    assert len(days) == 30  # one partition per day, as serving writes them
    parts = [store.get_parquet(k) for k in store.list(f"inference/model={MODEL}/")]
    logged = pd.concat(parts, ignore_index=True)
    assert list(logged.columns) == requestlog.INFERENCE_COLUMNS and logged["request_id"].is_unique
    assert all(requestlog.request_day(i) is not None for i in logged["request_id"].head(100))

    second = run_benchmark(home, data_dir, requests=20_000, days=30, calls=3, labels_per_call=100,
                           unlogged_per_call=5, flush_every=4)
    assert second["store_reused"] and second["labels_lost"] == 0 and second["join_errors"] == 0
    assert second["labels_kept"] == second["labels_sent"] == 300  # ids labelled by the first run are not sampled
    labels = requestlog.read_labels(store, MODEL)
    assert len(labels) == 1500 and labels["request_id"].is_unique


def test_the_other_replica_fault_loses_no_label(store):
    """``feedback.other_replica``, as a fault benchmark runs it, on both stores."""
    result = other_replica_fault(store, "support", labels=12)
    assert (result["accepted_before_flush"], result["waiting_before_flush"]) == (0, 12)
    assert result["settled_kept"] == result["labels_kept"] == result["labels_sent"] == 12
    assert (result["labels_waiting"], result["labels_quarantined"], result["labels_lost"]) == (0, 0, 0)
    assert result["join_errors"] == 0
