"""Labels one window late, on real local servers: one update per drift episode, each label counted once.

A scheduled monitor on a Prefect server checks drifted traffic whose labels
have not arrived: the drift episode opens and the check completes with
``wait for labels``. The labels arrive while the next window's traffic
comes in; the next scheduled check counts them over the episode and its
event starts the update deployment, which promotes and closes the episode.
A check while that update runs, and a duplicated drift event or a labels
event afterwards, start no second update. The path itself is built once per
session (``stack_session.scheduled_update``), shared with the other server
tests and the UI tests: it trains once.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest

from server import stack_session
from server.stack_session import MODEL, TERMINAL

pytestmark = [pytest.mark.server, pytest.mark.timeout(1500)]


def _episode_updates(client, episode: str) -> list:
    experiment = client.get_experiment_by_name("refit")
    return client.search_runs([experiment.experiment_id], "tags.`refit.run_type` = 'update' and "
                              f"tags.`refit.trigger_key` LIKE '{MODEL}:episode:{episode}:%'")


def test_a_scheduled_monitor_with_labels_one_window_late_starts_one_update_per_episode(stack, deployed):
    path = stack_session.scheduled_update(stack)
    client, episode = stack.mlflow(), path["episode_id"]
    late = set(path["late_labels"]["request_id"].astype(str))
    assert len(late) == len(path["late_labels"]) > 0

    # The first scheduled check: drift, the episode opens, no labels yet: waiting is a completed run.
    waiting = path["waiting_check"]
    assert waiting.data.tags["refit.drift_detected"] == "True"
    assert waiting.data.tags["refit.action"] == "wait for labels"
    assert waiting.data.tags["refit.episode_id"] == episode
    assert waiting.data.metrics["labelled_rows"] == 0
    assert path["first_monitor_run"]["auto_scheduled"]
    # Every monitor run completed, the waiting one included; none failed anywhere on the stack.
    assert path["monitor_runs"] and all(r["state_type"] == "COMPLETED" for r in path["monitor_runs"]), \
        [(r["name"], r["state_type"]) for r in path["monitor_runs"]]
    assert not [r for r in stack.flow_runs("monitor") if r["state_type"] in {"FAILED", "CRASHED"}]

    # The next scheduled check, on the next window: the same episode, the late labels counted once.
    check = path["drift_check"]
    assert check.data.tags["refit.window_start"] >= waiting.data.tags["refit.window_end"]
    assert check.data.tags["refit.episode_id"] == episode
    assert check.data.metrics["labelled_rows"] == len(late)

    # One update flow run for the episode, started by its event; one fine-tune paid for.
    assert path["update_runs"] == [path["update_run"]["id"]]
    assert path["update_run"]["parameters"]["episode_id"] == episode
    assert path["update_run"]["state_type"] == "COMPLETED", stack.run_logs(path["update_run"]["id"])
    (update,) = _episode_updates(client, episode)
    assert update.info.status == "FINISHED" and update.data.metrics["attempts"] >= 1
    assert update.data.tags["refit.gate_verdict"] == "passed"

    # The promotion closed the episode, saying which update did.
    closed = client.get_run(episode).data.tags
    assert closed["refit.run_type"] == "drift-episode"
    assert closed["refit.episode_status"] == "closed"
    assert update.info.run_id in closed["refit.closed_reason"]
    assert int(closed["refit.episode_windows"]) >= 2  # the waiting window and the one that had enough
    assert int(closed["refit.episode_tried_labels"]) == len(late)

    # The ledger of what the promotion used: each label that arrived before the update, once.
    from tasks.labels import used_keys

    used = used_keys(stack_session._store(stack), MODEL)
    used = used[used["run_id"] == update.info.run_id]
    assert used["key"].is_unique
    assert set(used["key"].astype(str)) == late
    assert set(used["role"]) == {"trained", "held_out"}


def test_a_duplicated_drift_event_or_a_labels_event_after_the_promotion_starts_no_second_update(stack, deployed):
    path = stack_session.scheduled_update(stack)
    client, episode = stack.mlflow(), path["episode_id"]
    champion = stack_session.champion(stack)
    before = {r["id"] for r in stack.flow_runs("update")}
    resource = {"prefect.resource.id": f"refit.model.{MODEL}"}
    now = datetime.now(timezone.utc).isoformat()
    drift = path["drift_check"]
    # The monitor's event again (a retried send, a second emitter), and labels announced after the promotion.
    events = [{"id": str(uuid.uuid4()), "occurred": now, "event": "refit.drift.detected", "resource": resource,
               "payload": {"model_name": MODEL, "episode_id": episode, "severity": drift.data.tags["refit.severity"],
                           "model_version": path["champion_before"], "drift_run_id": drift.info.run_id,
                           "labels": len(path["late_labels"])}},
              {"id": str(uuid.uuid4()), "occurred": now, "event": "refit.labels.arrived", "resource": resource,
               "payload": {"model_name": MODEL, "labels": 1}}]
    stack.call("/events", events)
    started = stack.wait_for("both events to start the update deployment", lambda: (
        lambda new: new if len(new) == 2 else None)([r for r in stack.flow_runs("update") if r["id"] not in before]),
        timeout=120)
    done = [stack.wait_done(run["id"], timeout=600) for run in started]
    assert all(run["state_type"] == "COMPLETED" for run in done), [stack.run_logs(r["id"]) for r in done]
    assert sorted(tuple(sorted(r["parameters"])) for r in done) == [
        ("drift_run_id", "episode_id", "model_name"), ("model_name",)]

    # Both found nothing to learn (the episode is closed, none is open) and trained nothing.
    def logged():
        logs = [stack.run_logs(run["id"]) for run in done]
        return all("nothing to learn" in log for log in logs)

    stack.wait_for("both updates to log that they had nothing to learn", logged, timeout=60)
    assert len(_episode_updates(client, episode)) == 1
    assert stack_session.champion(stack) == champion
    assert all(r["state_type"] in TERMINAL | {"SCHEDULED"} for r in stack.flow_runs("update"))
