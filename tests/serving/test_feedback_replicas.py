"""POST /feedback over real HTTP with several replicas, a write in flight, long texts and a caller over its quota.

The server here has no champion: /feedback needs no model, so these tests
train nothing. Another replica is a real ``RequestLog`` on the same store,
holding answered rows in its buffer until it flushes.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import httpx
import pytest

from refit import requestlog
from refit.store import LocalStore
from serving.requestlog import RequestLog

FEEDBACK = "feedback-secret"
HEADERS = {"Authorization": f"Bearer {FEEDBACK}"}


@pytest.fixture
def feedback_server(serving_env, monkeypatch):
    """``start(**env)``: a server with no champion, /feedback open, answering /healthz; stopped at the end."""
    from refit.settings import Settings
    from tests.serving.conftest import RunningServer

    started = []

    def start(**env) -> RunningServer:
        monkeypatch.setenv("REFIT_SERVE_FEEDBACK_TOKEN", FEEDBACK)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        server = RunningServer(Settings())
        server.thread.start()
        started.append(server)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(server.url + "/healthz", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server at {server.url} did not answer within 120 s")

    yield start
    for server in started:
        if server.thread.is_alive():
            server.stop()


def answered(n: int) -> list[dict]:
    now = datetime.now(timezone.utc)
    return [{"request_id": requestlog.new_request_id(now), "timestamp": now, "text": f"text {i}",
             "predicted_label": "balance", "confidence": 0.9, "model_version": "1", "served_by": "champion"}
            for i in range(n)]


def post(server, labels: list[dict], **kwargs) -> httpx.Response:
    return httpx.post(server.url + "/feedback", json={"labels": labels}, headers=HEADERS, timeout=60, **kwargs)


def test_labels_of_another_replicas_buffered_requests_wait_then_join_once_it_flushes(feedback_server):
    server = feedback_server()
    settings = server.state.settings
    store = LocalStore(settings.local_store_root)
    replica = RequestLog(store, settings.model_name, flush_rows=100_000, flush_seconds=3600)
    rows = answered(6)
    replica.append(rows)
    first = post(server, [{"request_id": r["request_id"], "label": "balance"} for r in rows])
    assert first.status_code == 200, first.text
    assert (first.json()["accepted"], first.json()["waiting"], first.json()["quarantined"]) == (0, 6, 0)

    assert replica.flush() == 6
    second = post(server, [{"text": "a fresh example", "label": "greeting"}]).json()
    assert second["accepted"] == 1 and second["earlier_waiting"] == {
        "kept": 6, "quarantined": 0, "waiting": 0, "reasons": {}, "busy": False}
    labels = requestlog.read_labels(store, settings.model_name)
    assert sorted(labels["request_id"]) == sorted(r["request_id"] for r in rows)


def test_rows_being_written_are_seen_as_served(feedback_server, tmp_path, monkeypatch):
    """The server's own flush is held mid-write: its rows are out of the buffer and not yet in the store."""
    faults_dir = tmp_path / "faults"
    monkeypatch.setenv("REFIT_FAULTS_DIR", str(faults_dir))
    monkeypatch.setenv("REFIT_FAULTS", "requestlog.flush.writing=pause")
    server = feedback_server()  # flushes a row once it is a second old
    rows = answered(3)
    server.state.request_log.append(rows)
    marker = faults_dir / "requestlog.flush.writing.paused"
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the flush never reached its write"
    try:
        settings = server.state.settings
        assert LocalStore(settings.local_store_root).list("inference/") == []
        got = post(server, [{"request_id": r["request_id"], "label": "balance"} for r in rows]).json()
        assert (got["accepted"], got["waiting"], got["quarantined"]) == (3, 0, 0)
    finally:
        marker.unlink(missing_ok=True)


def test_a_long_example_is_quarantined_with_the_limit_named(feedback_server):
    server = feedback_server(REFIT_SERVE_MAX_TEXT_CHARS="50")
    got = post(server, [{"text": "y" * 51, "label": "a"}, {"text": "short enough", "label": "a"}]).json()
    assert (got["accepted"], got["quarantined"]) == (1, 1)
    assert got["reasons"] == {"text is 51 characters; the limit is 50": 1}


def test_a_caller_over_its_quota_gets_429_and_others_do_not(feedback_server):
    server = feedback_server(REFIT_SERVE_FEEDBACK_LABELS_PER_MINUTE="100")
    examples = [{"text": f"example number {i}", "label": "a"} for i in range(100)]
    assert post(server, examples).status_code == 200
    refused = post(server, [{"text": f"more {i}", "label": "a"} for i in range(100)])  # needs a minute's refill
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "rate limit of 100 labels a minute per caller" in refused.json()["error"]
    too_big = post(server, [{"text": f"big {i}", "label": "a"} for i in range(101)])
    assert too_big.status_code == 429 and "split the batch" in too_big.json()["error"]
    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with other:
        elsewhere = other.post(server.url + "/feedback", json={"labels": [{"text": "from elsewhere", "label": "a"}]},
                               headers=HEADERS, timeout=60)
    assert elsewhere.status_code == 200 and elsewhere.json()["accepted"] == 1
