"""Property-based fuzzing (hypothesis) of the serving app's HTTP surface, over real HTTP to a real server.

Every body, header and route a client can send gets a 200 that says what it
did or a 4xx whose JSON ``error`` names the problem: never a 500, never a
traceback. What the server wrote adds up: request-log rows = texts answered;
label rows + example rows = labels accepted; quarantine rows = labels
quarantined. The unit-level parsers are fuzzed harder in
tests/unit/test_fuzz_inputs.py; here each case is a real request.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from refit import requestlog
from refit.store import LocalStore

FEEDBACK = "fuzz-feedback-token"
settings.register_profile(
    "refit-fuzz", deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
FUZZ = settings.get_profile("refit-fuzz")

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=10)
# Valid header values only: an invalid one is refused by uvicorn's HTTP parser before the app sees it.
CONTENT_TYPES = st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded", "x/y"])


@pytest.fixture
def server(registry, start_server, monkeypatch):
    """v1 served, /feedback open with its token; answered rows stay buffered until /admin/flush."""
    from refit.settings import Settings

    monkeypatch.setenv("REFIT_SERVE_FEEDBACK_TOKEN", FEEDBACK)
    monkeypatch.setenv("REFIT_SERVE_LOG_FLUSH_ROWS", "100000")
    monkeypatch.setenv("REFIT_SERVE_LOG_FLUSH_SECONDS", "3600")
    return start_server(settings=Settings())


def assert_refusal(response: httpx.Response) -> None:
    """A 4xx with a JSON body whose ``error`` is one line, or FastAPI's own 404/405 ``detail``."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    message = body.get("error", body.get("detail"))
    assert isinstance(message, str) and message.strip() and "\n" not in message, body
    assert "Traceback" not in response.text


def headers(content_type: str | None, token: str | None = None) -> dict[str, str]:
    out = {"content-type": content_type} if content_type else {}
    return out | ({"authorization": f"Bearer {token}"} if token else {})


def stored_rows(settings, kind: str) -> int:
    store = LocalStore(settings.local_store_root)
    return sum(len(store.get_parquet(key)) for key in store.list(f"{kind}/model={settings.model_name}/"))


def test_predict_answers_every_body_with_predictions_or_a_4xx(server, fuzz_cases):
    texts = server.state.settings.serve_max_texts
    real = st.sampled_from(_texts(server))
    text_items = st.lists(st.one_of(real, st.text(max_size=40), JSON), max_size=5)
    bodies = st.one_of(
        st.binary(max_size=100), JSON.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({"texts": text_items}, optional={"extra": JSON}).map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({"texts": st.lists(real, min_size=texts + 1, max_size=texts + 2)}).map(
            lambda v: json.dumps(v).encode()))
    answered = 0

    @settings(FUZZ, max_examples=100)
    @given(bodies, CONTENT_TYPES)
    @example(b'{"texts": [' + b"1" * 5000 + b"]}", "application/json")  # was a 500 (int digits limit)
    @example(b"[" * 100_000 + b"]" * 100_000, None)  # was a 500 (RecursionError)
    @example(b'{"texts": ["book a flight", "a\\ud800b"]}', "application/json")  # was a 500 from the tokenizer
    def check(body: bytes, content_type: str | None) -> None:
        nonlocal answered
        fuzz_cases["http_predict"] += 1
        response = httpx.post(server.url + "/predict", content=body, headers=headers(content_type), timeout=60)
        if response.status_code != 200:
            assert_refusal(response)
            return
        sent = json.loads(body)["texts"]
        predictions = response.json()["predictions"]
        assert len(predictions) == len(sent) and all(p["label"] and 0 <= p["confidence"] <= 1 for p in predictions)
        answered += len(sent)

    check()
    flushed = httpx.post(server.url + "/admin/flush", headers={"authorization": "Bearer test-admin-token"},
                         timeout=60)
    assert flushed.status_code == 200, flushed.text
    now = datetime.now(timezone.utc)
    logged = requestlog.read_inference(LocalStore(server.state.settings.local_store_root),
                                       server.state.settings.model_name, now - timedelta(days=1), now + timedelta(1))
    assert answered > 0 and len(logged) == answered  # one request-log row per answered text, no more


def _texts(server) -> list[str]:
    from refit.data import load_clinc150

    return load_clinc150(server.state.settings.data_dir)["text"].head(50).tolist()


def test_feedback_counts_every_label_or_refuses_the_body(server, fuzz_cases):
    answer = httpx.post(server.url + "/predict", json={"texts": _texts(server)[:4]}, timeout=60).json()
    served = [p["request_id"] for p in answer["predictions"]]
    item = st.dictionaries(
        st.sampled_from(["request_id", "label", "text", "other"]),
        st.one_of(st.sampled_from(served + ["never-served", "", " "]), st.text(max_size=8), st.none(), JSON),
        max_size=3)
    bodies = st.one_of(
        st.binary(max_size=80), JSON.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({"labels": st.lists(item, max_size=5)}).map(lambda v: json.dumps(v).encode()))
    tokens = st.sampled_from([FEEDBACK, FEEDBACK, FEEDBACK, None, "wrong", FEEDBACK[:-1], FEEDBACK.upper()])
    totals = {"accepted": 0, "waiting": 0, "quarantined": 0, "settled_into_quarantine": 0}

    @settings(FUZZ, max_examples=80)
    @given(bodies, tokens, CONTENT_TYPES)
    @example(json.dumps({"labels": [{"request_id": served[0], "label": "balance"}, {"text": "hi", "label": "greet"},
                                    {"request_id": "never-served", "label": "x"},  # waits: another replica's?
                                    {"request_id": served[1], "label": " "}]}).encode(), FEEDBACK, None)
    @example(b'{"labels": [{"request_id": "x", "label": "\\udfff"}]}', FEEDBACK, None)  # Parquet raised: a 500
    @example(b'{"labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", FEEDBACK, None)  # RecursionError: a 500
    def check(body: bytes, token: str | None, content_type: str | None) -> None:
        fuzz_cases["http_feedback"] += 1
        response = httpx.post(server.url + "/feedback", content=body, headers=headers(content_type, token),
                              timeout=60)
        if response.status_code != 200:
            assert_refusal(response)
            if token != FEEDBACK:
                assert response.status_code == 401
            return
        assert token == FEEDBACK
        result = response.json()
        assert result["accepted"] + result["waiting"] + result["quarantined"] == result["rows"] == \
            len(json.loads(body)["labels"])
        assert sum(result["reasons"].values()) == result["quarantined"]
        for key in ("accepted", "waiting", "quarantined"):
            totals[key] += result[key]
        totals["settled_into_quarantine"] += result["earlier_waiting"]["quarantined"]

    check()
    settings_ = server.state.settings
    assert totals["accepted"] > 0 and totals["waiting"] > 0 and totals["quarantined"] > 0
    # labels/ holds kept labels and those still waiting for their request; waiting ones may settle into quarantine
    assert stored_rows(settings_, "labels") + stored_rows(settings_, "examples") == \
        totals["accepted"] + totals["waiting"] - totals["settled_into_quarantine"]
    assert stored_rows(settings_, "quarantine") == totals["quarantined"] + totals["settled_into_quarantine"]
    kept = requestlog.read_labels(LocalStore(settings_.local_store_root), settings_.model_name)
    assert len(kept) <= len(served)  # each served request labelled at most once


ROUTES = ["/predict", "/feedback", "/healthz", "/readyz", "/metrics", "/rollout", "/admin/reload", "/admin/flush",
          "/docs", "/openapi.json", "/", "/predict/", "/admin"]


def test_every_route_and_method_answers_json_and_never_500(server, fuzz_cases):
    paths = st.sampled_from(ROUTES) | st.text(st.characters(min_codepoint=33, max_codepoint=126,
                                                            blacklist_characters="?#%"), max_size=12).map("/".__add__)
    auth = st.one_of(st.none(), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12).map(
        lambda t: f"Bearer {t}"),
                     st.sampled_from(["Basic abc", "Bearer", "bearer test-admin-token"]))

    @settings(FUZZ, max_examples=80)
    @given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]), paths, auth,
           st.binary(max_size=40))
    def check(method: str, path: str, authorization: str | None, body: bytes) -> None:
        fuzz_cases["http_routes"] += 1
        request_headers = {"authorization": authorization} if authorization is not None else {}
        try:
            response = httpx.request(method, server.url + path, content=body or None, headers=request_headers,
                                     timeout=60)
        except httpx.LocalProtocolError:  # a header httpx itself will not send: nothing reached the server
            return
        assert response.status_code < 500, (method, path, response.status_code, response.text)
        if response.status_code >= 400 and method != "HEAD":
            assert_refusal(response)
        if path.startswith("/admin"):
            assert response.status_code in (401, 404, 405), (path, response.status_code)  # no token matched

    check()
