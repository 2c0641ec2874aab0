"""Emit, then mark: a drift episode counts as tried only once its check's event is out (real SQLite MLflow).

Prefect's real events client (``prefect.events.emit_event``, Prefect 3.9) never
raises for a refused connection: it builds the event, queues it on the
``EventsWorker`` and returns it at once; the worker's thread connects later,
and a connection it cannot make is only logged ("Service 'EventsWorker' failed
with 1 pending items") while the event is lost. So these tests use the real
client: against the session's temporary Prefect API, and against a port where
nothing listens (in a child process, so its events worker is its own).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest

from tasks.episodes import EVENT_NOT_SENT
from tasks.monitor import DRIFT_EVENT, emit_then_mark
from registry import episodes
from registry.tracking import RUN_TYPE, configure


@pytest.fixture
def check_run(refit_env):
    experiment_id = configure(refit_env)
    tags = {RUN_TYPE: "drift-check", "refit.model": refit_env.model_name, "refit.champion_version": "1",
            "refit.action": EVENT_NOT_SENT, "refit.window_start": "2026-01-01T00:00:00", "refit.window_end": "2026-01-01T01:00:00"}
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        pass
    episode, _ = episodes.join_or_open(experiment_id, refit_env.model_name, "2026-01-01T00:00:00",
                                       "2026-01-01T01:00:00", "high", 1, run.info.run_id)
    return experiment_id, run.info.run_id, refit_env.model_name, episode.id


def test_a_sent_event_reaches_the_api_and_marks_the_episode_tried(check_run, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.filters import EventFilter, EventIDFilter, EventNameFilter
    from prefect.events.worker import EventsWorker

    experiment_id, run_id, name, episode_id = check_run
    sent = []

    def emit():
        sent.append(emit_event(DRIFT_EVENT, resource={"prefect.resource.id": f"refit.model.{name}"},
                               payload={"model_name": name, "drift_run_id": run_id}))
        return sent[-1]

    emit_then_mark(run_id, emit, mark=lambda: episodes.record_try(episode_id, 42))  # the monitor's call, real client
    assert mlflow.get_run(run_id).data.tags["refit.action"] == "update"
    assert episodes.get_episode(episode_id).tried_labels == 42
    (event,) = sent
    assert event is not None and event.event == DRIFT_EVENT
    EventsWorker.drain_all(timeout=60)  # the queued event goes out now
    found, deadline = [], time.monotonic() + 60  # the API stores events a moment after it receives them
    with get_client(sync_client=True) as client:
        while not found and time.monotonic() < deadline:
            found = client.read_events(EventFilter(id=EventIDFilter(id=[event.id]),
                                                   event=EventNameFilter(name=[DRIFT_EVENT])), limit=10).events
            if not found:
                time.sleep(0.5)
    assert [e.payload["drift_run_id"] for e in found] == [run_id]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # free once closed: nothing listens there


CHILD = textwrap.dedent("""
    import json, sys
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from tasks.monitor import DRIFT_EVENT, emit_then_mark
    from refit.errors import RefitError
    from refit.settings import Settings
    from registry import episodes
    from registry.tracking import configure

    configure(Settings())
    run_id, name, episode_id = sys.argv[1:4]
    outcome = {"raised": None, "returned": None}
    def emit():
        event = emit_event(DRIFT_EVENT, resource={"prefect.resource.id": f"refit.model.{name}"},
                           payload={"model_name": name, "drift_run_id": run_id})
        outcome["returned"] = type(event).__name__
        return event
    try:
        emit_then_mark(run_id, emit, mark=lambda: episodes.record_try(episode_id, 42))
    except RefitError as exc:
        outcome["raised"] = str(exc)
    EventsWorker.drain_all(timeout=120)  # the worker tries the refused API now, and only logs its failure
    print(json.dumps(outcome))
""")


def test_a_refused_events_api_leaves_the_episode_untried(check_run):
    experiment_id, run_id, name, episode_id = check_run
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_API_URL": f"http://127.0.0.1:{_closed_port()}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    child = subprocess.run([sys.executable, "-c", CHILD, run_id, name, episode_id], env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    outcome = json.loads(child.stdout.strip().splitlines()[-1])
    assert outcome["returned"] == "Event"  # the real client's answer to a refused connection: queued, no error
    assert "EventsWorker" in child.stderr  # ... and the failure, later, only in its log
    # The episode must stay untried, so that the next check starts the update again, and the caller must be told.
    assert mlflow.get_run(run_id).data.tags["refit.action"] == EVENT_NOT_SENT
    assert episodes.get_episode(episode_id).tried_labels == -1
    assert outcome["raised"] is not None and "next check will try again" in outcome["raised"]
