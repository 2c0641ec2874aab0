"""Updates under repetition and failure, on the real local stack: two at once, and a worker killed mid-update.

The claim under test: the champion is always a version that passed its gate,
whatever order updates run in and wherever one of them dies.

- Two updates of one drifted window (a window-based hand run, not a drift
  episode) started at once through two deployments
  (`update` and `hotfix`: separate deployment limits, so only the flow's
  per-model global limit keeps them apart) train once and promote at most
  one version; the second finds the first's run and pays for nothing.
- The worker and its flow run are SIGKILLed while an update trains. The
  champion does not move; the flow run is marked Crashed by the heartbeat
  automation `refit stack up` installs (infra/prefect/crash-zombies.yaml), which
  frees the deployment's slot; `refit stack up` restarts the worker; the same
  window run again trains (the killed run paid for nothing that finished),
  closes the killed run's MLflow runs as KILLED, and ends gated.

These run last (``runs_last``): they move the champion, and the UI tests
review the scheduled promotion.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from refit import processes
from server import stack_session
from server.stack_session import MODEL, REFIT

pytestmark = [pytest.mark.server, pytest.mark.runs_last, pytest.mark.timeout(1500)]


def _window(stack, days_ago: int, seed_offset: int) -> dict:
    """A drifted window of its own, days back so it overlaps no other test's traffic."""
    end = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=days_ago)
    start, end = stack_session.write_drifted_window(stack, stack_session.champion(stack), end, seed_offset)
    return {"window_start": start.isoformat(), "window_end": end.isoformat()}


def _update_runs(client, experiment_id: str, window: dict, status: str | None = None):
    """The update runs of a window run by hand (keyed by the window; an episode's update keys on the episode
    and its labels instead)."""
    key = f"{MODEL}:window:{window['window_start']}..{window['window_end']}"
    status_filter = f" and attributes.status = '{status}'" if status else ""
    return client.search_runs([experiment_id], f"tags.`refit.trigger_key` = '{key}'{status_filter}")


GATED = {"passed", "bootstrap (no gate)"}


def _assert_champion_passed_its_gate(client) -> None:
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.tags.get("refit.gate_verdict") in GATED, champion.tags
    for version in client.search_model_versions(f"name='{MODEL}'"):
        if version.tags.get("refit.deployed") == "champion":  # every version ever promoted
            assert version.tags.get("refit.gate_verdict") in GATED, (version.version, version.tags)


def test_two_updates_of_one_window_at_once_train_once_and_promote_at_most_one(stack, deployed):
    client = stack.mlflow()
    experiment_id = client.get_experiment_by_name("refit").experiment_id
    before = stack_session.champion(stack)
    versions_before = {v.version for v in client.search_model_versions(f"name='{MODEL}'")}
    window = _window(stack, days_ago=2, seed_offset=2)
    runs = [stack_session.run_deployment(stack, name, window) for name in ("update/update", "update/hotfix")]
    done = [stack.wait_done(run["id"], timeout=900) for run in runs]
    assert all(run["state_type"] == "COMPLETED" for run in done), [stack.run_logs(r["id"]) for r in done]

    trained = [r for r in _update_runs(client, experiment_id, window) if r.data.metrics.get("attempts", 0) >= 1]
    assert len(trained) == 1, [r.info.run_id for r in trained]  # one fine-tune paid for
    # Prefect ships a run's logs in batches, after its state may already read Completed: wait for them.
    def duplicate_logged():
        logs = [stack.run_logs(run["id"]) for run in done]
        return sum("not paying for a second fine-tune" in log for log in logs) == 1

    stack.wait_for("the second update to log that it paid for nothing", duplicate_logged, timeout=60)
    (new,) = [v for v in client.search_model_versions(f"name='{MODEL}'") if v.version not in versions_before]
    # One version at most moved the champion: this one, if and only if it passed its gate.
    passed = new.tags["refit.gate_verdict"] == "passed"
    assert (new.tags.get("refit.deployed") == "champion") == passed
    assert stack_session.champion(stack) == (int(new.version) if passed else before)
    _assert_champion_passed_its_gate(client)


def test_worker_killed_mid_update_leaves_the_registry_consistent(stack, deployed):
    client = stack.mlflow()
    experiment_id = client.get_experiment_by_name("refit").experiment_id
    before = stack_session.champion(stack)
    window = _window(stack, days_ago=3, seed_offset=3)
    run = stack_session.run_deployment(stack, "update/update", window)

    def training():  # the update is past its checks and inside a training attempt
        return [r for r in client.search_runs([experiment_id], "tags.`refit.run_type` = 'update-attempt' "
                                              "and attributes.status = 'RUNNING'")]

    stack.wait_for("the update to start training", training, timeout=600, every=1.0)
    worker_pid = int((stack.home / "stack" / "worker.pid").read_text())
    killed = stack_session.kill_tree(worker_pid)
    assert len(killed) >= 2  # the worker and the flow run's process
    stack.wait_for("the killed processes to be gone", lambda: not any(processes.alive(p) for p in killed),
                   timeout=30, every=0.2)

    # Nothing moved: the champion is the gated version it was.
    assert stack_session.champion(stack) == before
    _assert_champion_passed_its_gate(client)
    # No heartbeat: the automation marks the run Crashed, which frees the deployment's slot.
    crashed = stack.wait_done(run["id"], timeout=300)
    assert crashed["state_type"] == "CRASHED", crashed["state"]
    assert "heartbeat" in (crashed["state"]["message"] or "")
    assert _update_runs(client, experiment_id, window, status="RUNNING")  # MLflow still shows it running

    # Restart the worker (what a supervisor or a person does) and run the same window again.
    stack.run(REFIT + ["stack", "up", "--json"])
    again = stack.wait_done(stack_session.run_deployment(stack, "update/update", window)["id"], timeout=900)
    assert again["state_type"] == "COMPLETED", stack.run_logs(again["id"])
    stack.wait_for("the rerun to log the run it closed", lambda: "left running by a killed update"
                   in stack.run_logs(again["id"]), timeout=60)
    # The killed run is closed as KILLED, with why; the rerun trained (the killed one paid for nothing finished).
    runs = _update_runs(client, experiment_id, window)
    killed_runs = [r for r in runs if r.info.status == "KILLED"]
    assert len(killed_runs) == 1 and "killed" in killed_runs[0].data.tags["refit.abandoned"]
    # Its training was never metered: the month's budget is charged at least its estimate.
    charged = killed_runs[0].data.metrics
    assert charged["update_cost_usd"] >= charged["estimate_cost_usd"] > 0
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.metrics["attempts"] >= 1
    attempts = client.search_runs([experiment_id], "tags.`refit.run_type` = 'update-attempt' "
                                                   "and attributes.status = 'RUNNING'")
    assert attempts == []
    _assert_champion_passed_its_gate(client)
    (rerun_version,) = client.search_model_versions(f"name='{MODEL}' and tags.`refit.update_run_id` = "
                                                    f"'{finished[0].info.run_id}'")
    assert stack_session.champion(stack) == (int(rerun_version.version)
                                             if rerun_version.tags["refit.gate_verdict"] == "passed" else before)
