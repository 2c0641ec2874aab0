"""``refit.labels.arrived`` from ``/feedback``: sent to a real Prefect API, at most one per model a minute.

The coalescing is tested on ``serving.app.LabelEvents`` itself with a short
interval and a recording sender (no API: the timing is the point); the
wire format and the ``/feedback`` wiring against Prefect's real test API
(``prefect_test_harness``, shared by the session) and a real server.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from serving.app import LABELS_EVENT, LabelEvents

FEEDBACK = "feedback-secret"


class Recorder:
    def __init__(self, fail: bool = False):
        self.sent: list[tuple[str, int, float]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, model_name: str, labels: int) -> None:
        with self.lock:
            self.sent.append((model_name, labels, time.monotonic()))
        if self.fail:
            raise ConnectionRefusedError("nothing listens there")

    def wait_for(self, count: int, seconds: float = 10.0) -> list[tuple[str, int, float]]:
        deadline = time.monotonic() + seconds
        while len(self.sent) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.sent)


def test_at_most_one_event_per_model_per_interval_and_no_label_left_unannounced():
    recorder = Recorder()
    events = LabelEvents("http://127.0.0.1:9/api", every=0.6, send=recorder)
    started = time.monotonic()
    events.arrived("a", 3)
    first = recorder.wait_for(1)
    assert [(m, n) for m, n, _ in first] == [("a", 3)] and first[0][2] - started < 0.5  # the first goes out at once
    for labels in (2, 4, 1):  # a burst within the interval: one event, at its end, with all of them
        events.arrived("a", labels)
    events.arrived("b", 5)  # another model has its own interval
    sent = recorder.wait_for(3)
    assert sorted((m, n) for m, n, _ in sent) == [("a", 3), ("a", 7), ("b", 5)]
    a_times = [t for m, _, t in sent if m == "a"]
    assert a_times[1] - a_times[0] >= 0.6 - 0.02
    time.sleep(0.8)
    assert len(recorder.sent) == 3  # nothing more owed: no event without labels
    events.arrived("a", 0)
    time.sleep(0.1)
    assert len(recorder.sent) == 3


def test_a_stopping_server_announces_what_it_still_owes():
    recorder = Recorder()
    events = LabelEvents("http://127.0.0.1:9/api", every=60, send=recorder)
    events.arrived("a", 2)
    recorder.wait_for(1)
    events.arrived("a", 5)  # due in a minute
    time.sleep(0.1)
    assert len(recorder.sent) == 1
    events.stop()
    assert [(m, n) for m, n, _ in recorder.sent] == [("a", 2), ("a", 5)]


def test_without_an_api_nothing_is_sent_and_a_refused_api_is_a_warning(caplog):
    quiet = Recorder()
    LabelEvents(None, every=0.1, send=quiet).arrived("a", 3)
    time.sleep(0.2)
    assert quiet.sent == []
    failing = Recorder(fail=True)
    events = LabelEvents("http://user:hunter2@127.0.0.1:9/api", every=0.1, send=failing)
    with caplog.at_level(logging.WARNING, logger="refit.serving"):
        events.arrived("a", 3)
        failing.wait_for(1)
        time.sleep(0.1)
    assert any(LABELS_EVENT in r.getMessage() and "ConnectionRefusedError" in r.getMessage()
               and "hunter2" not in r.getMessage() for r in caplog.records)


def _events(since: datetime, model_name: str, count: int, seconds: float = 60.0) -> list:
    """The ``refit.labels.arrived`` events about ``model_name`` stored by the Prefect API since ``since``."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    where = EventFilter(occurred=EventOccurredFilter(since=since), event=EventNameFilter(name=[LABELS_EVENT]),
                        resource=EventResourceFilter(id=[f"refit.model.{model_name}"]))
    found, deadline = [], time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            found = client.read_events(where, limit=50).events
            if len(found) >= count:
                break
            time.sleep(0.5)  # the API stores an event a moment after it takes it
    return sorted(found, key=lambda e: e.occurred)


@pytest.fixture
def prefect_api(monkeypatch) -> str:
    """A temporary Prefect API of this test's own (about 15 s to start): the test reads back the events the API
    stored, so it runs against an API that no other test of the session has loaded."""
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        url = get_current_settings().api.url
        monkeypatch.setenv("PREFECT_API_URL", url)
        _wait_until_events_are_stored(url)
        yield url


def _wait_until_events_are_stored(url: str, seconds: float = 90.0) -> None:
    """Post probe events until the API stores one. The API answers before its event persister subscribes to
    the in-memory topic, and an event posted in between is dropped; a real server's first seconds are the same."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    probe = LabelEvents(url)
    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            probe._post("probe", 0)  # about model "probe": the tests below read only their own model's events
            time.sleep(1.0)
            stored = client.read_events(EventFilter(event=EventNameFilter(name=[LABELS_EVENT])), limit=1).events
            if stored:
                return
    raise AssertionError(f"the Prefect API at {url} stored no event in {seconds:.0f} s")


def test_feedback_announces_kept_labels_to_the_prefect_api_once_a_minute(registry, start_server, prefect_api,
                                                                         monkeypatch):
    from refit.settings import Settings

    monkeypatch.setenv("REFIT_SERVE_FEEDBACK_TOKEN", FEEDBACK)
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    server = start_server(settings=Settings())
    assert server.app.state.label_events.api_url == prefect_api
    answer = httpx.post(server.url + "/predict", json={"texts": registry.adapters.texts[:4]}, timeout=30).json()
    ids = [p["request_id"] for p in answer["predictions"]]
    headers = {"Authorization": f"Bearer {FEEDBACK}"}
    labels = [{"request_id": ids[0], "label": "balance"}, {"request_id": ids[1], "label": "transfer"},
              {"request_id": ids[1], "label": "balance"}]  # a duplicate: quarantined, not announced
    got = httpx.post(server.url + "/feedback", json={"labels": labels}, headers=headers, timeout=30)
    assert got.status_code == 200 and got.json()["accepted"] == 2, got.text
    [first] = _events(since, registry.name, 1)
    assert first.payload == {"model_name": registry.name, "labels": 2}
    # More labels within the minute: no second event yet; the server owes it and sends it when it stops.
    more = httpx.post(server.url + "/feedback", json={"labels": [{"request_id": ids[2], "label": "balance"}]},
                      headers=headers, timeout=30)
    assert more.status_code == 200 and more.json()["accepted"] == 1
    time.sleep(2)
    assert len(_events(since, registry.name, 2, seconds=3)) == 1
    server.stop()
    found = _events(since, registry.name, 2)
    assert [e.payload["labels"] for e in found] == [2, 1]
