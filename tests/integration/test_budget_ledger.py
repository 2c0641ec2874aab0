"""The month's budget ledger against a real MLflow store (SQLite in tmp_path): reservations and killed updates.

Two embedded updates at once must not both pass the budget check (so cost
is reserved before training, not only logged at the end), and a killed
embedded update must not stay RUNNING uncharged. Each test here fails where
``month_spend`` counts only ``update_cost_usd`` or ``close_abandoned_updates``
judges only flow runs on a Prefect server.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

import mlflow
import pytest
from mlflow import MlflowClient

from refit import processes
from registry import tracking
from tasks import budget

MODEL = "ledger-test"


@pytest.fixture
def experiment(refit_env) -> str:
    return tracking.configure(refit_env)


def _month_start_ms() -> int:
    now = datetime.now(timezone.utc)
    return int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)


def _update_run(experiment: str, process: str | None = None, **metrics: float) -> str:
    """An update run left RUNNING, as a process that is training (or was killed while training) leaves it."""
    tags = {tracking.RUN_TYPE: "update", "refit.model": MODEL}
    if process:
        tags["refit.process"] = process
    run = MlflowClient().create_run(experiment, tags=tags)
    for key, value in metrics.items():
        MlflowClient().log_metric(run.info.run_id, key, value)
    return run.info.run_id


def _dead_process() -> str:
    """The identity of a process that ran on this host and has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    identity = processes.identity(child.pid)
    child.kill()
    child.wait()
    return identity


def test_a_running_updates_reservation_counts_in_the_months_spend(experiment):
    _update_run(experiment, process=processes.identity(), reserved_usd=0.30)  # still training
    finished = _update_run(experiment, reserved_usd=0.50, update_cost_usd=0.20)  # charged less than reserved
    MlflowClient().set_terminated(finished)
    assert budget.month_spend(experiment, MODEL, _month_start_ms()) == pytest.approx(0.50)


def test_two_updates_racing_for_the_last_headroom_do_not_both_fit(experiment):
    first, second = _update_run(experiment), _update_run(experiment)
    fits, spend = budget.reserve_budget(experiment, MODEL, first, 0.6, 1.0, _month_start_ms())
    assert fits and spend == pytest.approx(0.6)
    fits, spend = budget.reserve_budget(experiment, MODEL, second, 0.6, 1.0, _month_start_ms())
    assert not fits and spend == pytest.approx(1.2)  # it saw the first's reservation
    # The refused reservation is withdrawn: the ledger holds only the first's.
    assert budget.month_spend(experiment, MODEL, _month_start_ms()) == pytest.approx(0.6)
    # A cheaper rung still fits beside it.
    assert budget.reserve_budget(experiment, MODEL, second, 0.3, 1.0, _month_start_ms()) == (True, pytest.approx(0.9))


def test_a_killed_embedded_update_is_closed_killed_and_charged_by_the_next(experiment):
    client = MlflowClient()
    killed = _update_run(experiment, process=_dead_process(), estimate_cost_usd=0.01, reserved_usd=0.04)
    with mlflow.start_run(experiment_id=experiment, tags={"mlflow.parentRunId": killed}) as attempt:
        mlflow.log_metric("update_cost_usd", 0.03)  # a finished rung; the next one was training when killed
    open_attempt = client.create_run(experiment, tags={"mlflow.parentRunId": killed}).info.run_id
    training = _update_run(experiment, process=processes.identity(), reserved_usd=0.02)  # alive: not ours to close
    on_another_host = _update_run(experiment, process="elsewhere:1:1", reserved_usd=0.05)

    closed = tracking.close_abandoned_updates(experiment, MODEL, "the next update", flow_run_ended=None)

    assert closed == [killed, open_attempt]
    run = client.get_run(killed)
    assert run.info.status == "KILLED" and "killed" in run.data.tags["refit.abandoned"]
    assert run.data.metrics["update_cost_usd"] == pytest.approx(0.04)  # its reservation: finished rung + estimate
    assert client.get_run(open_attempt).info.status == "KILLED"
    assert client.get_run(attempt.info.run_id).info.status == "FINISHED"
    assert {client.get_run(r).info.status for r in (training, on_another_host)} == {"RUNNING"}
    assert budget.month_spend(experiment, MODEL, _month_start_ms()) == pytest.approx(0.04 + 0.02 + 0.05)


def test_the_ledger_reads_every_page_of_update_runs(experiment):
    """A month with more update runs than one search page returns still counts each of them."""
    for _ in range(7):
        _update_run(experiment, update_cost_usd=0.01)
    runs = budget.month_updates(experiment, MODEL, _month_start_ms(), page_size=3)
    assert len(runs) == 7 and len({run.info.run_id for run in runs}) == 7
    assert budget.month_spend(experiment, MODEL, _month_start_ms()) == pytest.approx(0.07)
