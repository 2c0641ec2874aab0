"""The request log against a real S3 endpoint that is down, then started: every row reaches the bucket, once.

The endpoint is a moto server started by the test on a port where nothing
listened before (so the outage is a refused connection, as when S3 or MinIO
is down), and its data lives as long as the process.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import datetime, timezone

import pytest

from refit.bench.children import free_port
from refit.store import S3Store
from serving.requestlog import RequestLog
from tests.conftest import FAKE_AWS, _wait_until_answers


def _rows(n: int) -> list[dict]:
    now = datetime.now(timezone.utc)
    return [{"request_id": uuid.uuid4().hex, "timestamp": now, "text": f"text {i}", "predicted_label": "a",
             "confidence": 0.5, "model_version": "1"} for i in range(n)]


def test_rows_answered_while_s3_is_down_wait_on_disk_and_reach_the_bucket_once(tmp_path, monkeypatch):
    for key, value in FAKE_AWS.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    store = S3Store(f"log-{uuid.uuid4().hex[:8]}", endpoint_url=endpoint)
    log = RequestLog(store, "m", flush_rows=10, flush_seconds=3600, spill_dir=tmp_path / "spill")
    first, second = _rows(25), _rows(7)
    log.append(first)
    assert log.flush() == 0  # the endpoint refuses connections: spilled, not kept in memory, not lost
    log.append(second)
    assert log.flush() == 0
    assert (log.buffered, log.rows_spilled, log.rows_logged) == (0, 32, 0)
    with pytest.raises(Exception):
        log.drain()  # still down: nothing moves, nothing is lost
    assert log.rows_spilled == 32

    # A log opened on the same directory (a restarted server) sees what waits there.
    assert RequestLog(store, "m", spill_dir=tmp_path / "spill").rows_spilled == 32

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_until_answers(endpoint, proc)
        store.ensure_bucket()
        assert log.drain() == 32
        log.drain()  # again: nothing left, nothing written twice
        frame = store.read_parquet_prefix("inference/model=m/")
        assert sorted(frame["request_id"]) == sorted(r["request_id"] for r in first + second)
        assert (log.rows_spilled, log.rows_logged) == (0, 32)
        assert list((tmp_path / "spill").rglob("*.parquet")) == []
    finally:
        proc.terminate()
        proc.wait(timeout=10)
