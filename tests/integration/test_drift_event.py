"""Emit, then mark: a drift check whose event never left does not deduplicate its window (real SQLite MLflow)."""

from __future__ import annotations

import mlflow
import pytest

from flows.monitor import UNSENT, emit_then_mark
from refit.errors import RefitError
from registry.tracking import RUN_TYPE, configure, update_triggers


@pytest.fixture
def check_run(refit_env):
    experiment_id = configure(refit_env)
    tags = {RUN_TYPE: "drift-check", "refit.model": refit_env.model_name, "refit.champion_version": "1",
            "refit.action": UNSENT, "refit.window_start": "2026-01-01T00:00:00", "refit.window_end": "2026-01-01T01:00:00"}
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        pass
    return experiment_id, run.info.run_id, refit_env.model_name


def _fails():
    raise ConnectionError("events API refused the connection")


def test_a_failed_emit_leaves_the_window_unmarked(check_run):
    experiment_id, run_id, name = check_run
    with pytest.raises(RefitError, match="not sent .*next check will try again"):
        emit_then_mark(run_id, _fails)
    # Before, the run was tagged `update` before the event went out: dedupe then refused the window forever.
    assert update_triggers(experiment_id, name, 1) == []
    assert mlflow.get_run(run_id).data.tags["refit.action"] == UNSENT


def test_a_sent_event_marks_the_window(check_run):
    experiment_id, run_id, name = check_run
    emit_then_mark(run_id, lambda: object())
    assert [t.run_id for t in update_triggers(experiment_id, name, 1)] == [run_id]
