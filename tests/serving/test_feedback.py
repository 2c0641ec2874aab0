"""POST /feedback over real HTTP: labels checked as `refit labels import` checks them, buffered ids included."""

from __future__ import annotations

import httpx

from refit import requestlog
from refit.store import LocalStore

FEEDBACK = "feedback-secret"


def test_feedback_needs_its_token_and_counts_every_label(registry, start_server, monkeypatch):
    from refit.settings import Settings

    monkeypatch.setenv("REFIT_SERVE_LOG_FLUSH_ROWS", "100000")  # answered rows stay in the server's buffer
    monkeypatch.setenv("REFIT_SERVE_LOG_FLUSH_SECONDS", "3600")
    unset = start_server(settings=Settings())
    refused = httpx.post(unset.url + "/feedback", json={"labels": [{"request_id": "x", "label": "y"}]})
    assert refused.status_code == 403 and "REFIT_SERVE_FEEDBACK_TOKEN" in refused.json()["error"]
    unset.stop()

    monkeypatch.setenv("REFIT_SERVE_FEEDBACK_TOKEN", FEEDBACK)
    settings = Settings()
    server = start_server(settings=settings)
    answer = httpx.post(server.url + "/predict", json={"texts": registry.adapters.texts[:3]}, timeout=30).json()
    ids = [p["request_id"] for p in answer["predictions"]]
    labels = [{"request_id": ids[0], "label": "balance"},
              {"request_id": ids[1], "label": "a_label_the_model_never_saw"},  # the new-label policy decides
              {"request_id": ids[0], "label": "transfer"},                     # duplicate
              {"request_id": "never-served", "label": "balance"},
              {"request_id": ids[2], "label": "  "}]
    headers = {"Authorization": f"Bearer {FEEDBACK}"}
    assert httpx.post(server.url + "/feedback", json={"labels": labels}).status_code == 401
    got = httpx.post(server.url + "/feedback", json={"labels": labels}, headers=headers, timeout=30)
    assert got.status_code == 200, got.text
    body = got.json()
    assert (body["accepted"], body["waiting"], body["quarantined"]) == (2, 1, 2)  # never-served: another replica's?
    assert body["accepted"] + body["waiting"] + body["quarantined"] == len(labels)
    assert body["reasons"] == {"duplicate request_id in this batch": 1, "label is empty": 1}
    bad = httpx.post(server.url + "/feedback", json={"labels": [{"request_id": 7, "label": "x"}]}, headers=headers)
    assert bad.status_code == 422 and "labels[0]" in bad.json()["error"]
    assert httpx.post(server.url + "/feedback", content=b"{", headers=headers).status_code == 400
    server.stop()
    stored = requestlog.read_labels(LocalStore(settings.local_store_root), settings.model_name)
    assert sorted(stored["request_id"]) == sorted(ids[:2]) and set(stored["source"]) == {"feedback"}
