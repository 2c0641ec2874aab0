"""The server over real HTTP: answers, refusals, metrics, and the request log after a clean stop."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from refit import requestlog
from refit.store import LocalStore
from tests.serving.conftest import TOKEN, unique_texts

BAD_REQUESTS = [
    ("empty list", b'{"texts": []}', 422, '"texts" is empty'),
    ("empty text", b'{"texts": ["book a flight", "   "]}', 422, "texts[1] is empty"),
    ("non-string", b'{"texts": ["hello", 42]}', 422, "texts[1] is not a string (got int)"),
    ("null text", b'{"texts": [null]}', 422, "texts[0] is not a string (got NoneType)"),
    ("texts not a list", b'{"texts": "book a flight"}', 422, '"texts" must be a list of strings, not str'),
    ("no texts field", b'{"text": ["hi"]}', 422, 'body must be a JSON object with a "texts" list'),
    ("unknown field", b'{"texts": ["hi"], "debug": true}', 422, "unknown field(s) 'debug'"),
    ("1 MB text", json.dumps({"texts": ["a" * (1 << 20)]}).encode(), 413, "texts[0] is 1,048,576 characters"),
    ("batch over the limit", json.dumps({"texts": ["hi"] * 65}).encode(), 413, '"texts" has 65 texts; the limit is 64'),
    ("malformed JSON", b'{"texts": ["hi"', 400, "malformed JSON"),
    ("not JSON at all", b"texts=hi", 400, "malformed JSON"),
    ("body over the limit", json.dumps({"texts": ["a" * 2000] * 2500}).encode(), 413, "request body is"),
]


def test_predict_answers_label_confidence_and_version(registry, start_server):
    server = start_server()
    texts = registry.adapters.texts[:5]
    answer = httpx.post(server.url + "/predict", json={"texts": texts}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == 1
    assert len(body["predictions"]) == 5
    labels = set(json.loads((registry.adapters.good / "labels.json").read_text()))
    for prediction in body["predictions"]:
        assert prediction["label"] in labels
        assert 0 < prediction["confidence"] <= 1
        assert prediction["model_version"] == 1
    assert len({p["request_id"] for p in body["predictions"]}) == 5
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready", "model_version": 1}
    assert httpx.get(server.url + "/rollout").json()["runtimes"] == {"1": "onnx"}  # the default runtime, checked


def test_bad_requests_get_4xx_naming_the_problem_and_serving_goes_on(registry, start_server):
    server = start_server()
    statuses: dict[int, int] = {}
    for name, body, status, message in BAD_REQUESTS:
        answer = httpx.post(server.url + "/predict", content=body, headers={"Content-Type": "application/json"},
                            timeout=30)
        assert answer.status_code == status, f"{name}: {answer.text[:300]}"
        assert message in answer.json()["error"], name
        statuses[status] = statuses.get(status, 0) + 1
        still = httpx.post(server.url + "/predict", json={"texts": ["what is my balance"]}, timeout=30)
        assert still.status_code == 200, f"after {name}: {still.text[:300]}"
    metrics = httpx.get(server.url + "/metrics").text
    for status, count in statuses.items():
        assert f'refit_requests_total{{status="{status}"}} {float(count)}' in metrics
    assert f'refit_requests_total{{status="200"}} {float(len(BAD_REQUESTS))}' in metrics
    assert server.state.request_log.buffered + server.state.request_log.rows_logged == len(BAD_REQUESTS)


def test_metrics_in_prometheus_format(registry, start_server):
    server = start_server()
    for _ in range(3):
        assert httpx.post(server.url + "/predict", json={"texts": registry.adapters.texts[:4]}, timeout=30).is_success
    httpx.post(server.url + "/predict", json={"texts": []})
    metrics = httpx.get(server.url + "/metrics").text
    assert 'refit_requests_total{status="200"} 3.0' in metrics
    assert 'refit_request_errors_total{kind="bad_request"} 1.0' in metrics
    assert 'refit_request_latency_seconds_count{version="1"} 3.0' in metrics
    assert 'refit_model_version{role="champion"} 1.0' in metrics
    predicted = [line for line in metrics.splitlines() if line.startswith("refit_predictions_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in predicted) == 12
    mean = next(line for line in metrics.splitlines() if line.startswith('refit_mean_confidence{version="1"}'))
    assert 0 < float(mean.rsplit(" ", 1)[1]) <= 1
    assert "refit_inference_cost_per_1k_usd" in metrics


def test_admin_endpoints_need_the_token(registry, start_server):
    server = start_server()
    assert httpx.post(server.url + "/admin/reload").status_code == 401
    wrong = httpx.post(server.url + "/admin/reload", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "REFIT_SERVE_ADMIN_TOKEN" in wrong.json()["error"]
    right = httpx.post(server.url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert right.status_code == 200 and right.json()["adopted"] == "already serving"


def _send_all(url: str, batches: list[list[str]]) -> list[dict]:
    """Send the batches from 8 threads; every answer must be a 200. Returns predictions with their text."""
    def send(texts: list[str]) -> list[dict]:
        answer = httpx.post(url + "/predict", json={"texts": texts}, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()["predictions"]

    with ThreadPoolExecutor(8) as pool:
        return [p | {"text": t} for texts, preds in zip(batches, pool.map(send, batches)) for t, p in zip(texts, preds)]


def test_request_log_holds_every_answered_row_after_a_clean_stop(registry, start_server, monkeypatch):
    from refit.settings import Settings

    monkeypatch.setenv("REFIT_SERVE_LOG_FLUSH_ROWS", "100000")
    monkeypatch.setenv("REFIT_SERVE_LOG_FLUSH_SECONDS", "3600")
    settings = Settings()
    server = start_server(settings=settings)
    batches = [unique_texts(registry.adapters.texts, 1 + i % 7) for i in range(60)]
    answered = _send_all(server.url, batches)
    assert server.state.request_log.rows_logged == 0  # all still buffered: only the stop writes them
    server.stop()

    logged = LocalStore(settings.local_store_root).read_parquet_prefix(f"inference/model={settings.model_name}/")
    assert list(logged.columns) == requestlog.INFERENCE_COLUMNS
    assert len(logged) == len(answered) == sum(map(len, batches))
    by_id = logged.set_index("request_id")
    for p in answered:
        row = by_id.loc[p["request_id"]]
        assert (row["text"], row["predicted_label"], row["model_version"]) == (p["text"], p["label"], "1")
        assert row["confidence"] == pytest.approx(p["confidence"], abs=1e-5)


def test_request_log_flushes_by_size_and_by_time(registry, start_server, serving_env):
    server = start_server()  # flushes at 50 rows or 1 s
    log = server.state.request_log
    texts = unique_texts(registry.adapters.texts, 70)

    def wait_until(what: str, done, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done(), f"{what}: {log.rows_logged} rows logged in {log.parts_written} parts, {log.buffered} buffered"

    # 56 rows: past the size threshold, so a part is written at once (well before the 1 s age limit).
    answered = _send_all(server.url, [texts[i : i + 7] for i in range(0, 56, 7)])
    started = time.monotonic()
    wait_until("a part by size", lambda: log.parts_written >= 1 and log.buffered == 0)
    assert log.rows_logged == 56 and log.parts_written == 1
    # 14 more rows stay under the size threshold: they are written when the oldest is 1 s old.
    answered += _send_all(server.url, [texts[56:63], texts[63:70]])
    assert log.buffered == 14
    wait_until("a part by age", lambda: log.parts_written == 2)
    assert log.rows_logged == 70 and len(answered) == 70
    assert time.monotonic() - started >= 0.9  # the age limit, not the size, wrote the second part
    window = requestlog.read_inference(LocalStore(serving_env.local_store_root), serving_env.model_name,
                                       datetime.now(timezone.utc) - timedelta(hours=1),
                                       datetime.now(timezone.utc) + timedelta(minutes=1))
    assert len(window) == 70  # what the monitor reads
