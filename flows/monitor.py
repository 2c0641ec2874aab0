"""monitor: validate the newest traffic window, measure drift, follow the episode, decide what to do.

A drifted window opens the model's drift episode or joins it; the open
episode's labels (every one that arrived since it began) decide between
``wait for labels`` and ``update``. When an update can start, the check emits
the Prefect event ``refit.drift.detected``; on a Prefect server the
``update`` deployment is triggered by that event.
"""

from __future__ import annotations

from prefect import flow

from flows.common import one_at_a_time, open_context, settings_for, user_error
from refit.cost import StageMeters
from refit.errors import RefitError, WindowTooSmall
from tasks.monitor import (DRIFT_EVENT, begin_check, check_run, follow_episode, measure, publish,  # noqa: F401
                           quiet_hour, read_window, record, request_update)


@flow(name="monitor")
def monitor(window_end: str | None = None, window_hours: float | None = None, policy: str | None = None,
            model_name: str | None = None) -> dict:
    """Check the traffic window ending at ``window_end`` (default now).

    With ``window_hours`` unset the window starts where the previous check
    ended (at most 24 hours back), so a window is never measured twice.
    ``model_name``: which model's traffic (default ``REFIT_MODEL_NAME``); the
    drift event carries it to the update.
    """
    try:
        settings = settings_for(model_name)
    except RefitError as exc:
        return user_error(exc)
    try:  # one check per model at a time: two at once could both see the same window as new
        with one_at_a_time(f"refit-monitor-{settings.model_name}"):
            return check_model(settings, window_end, window_hours, policy)
    except RefitError as exc:  # the slot never came free
        return user_error(exc)


def check_model(settings, window_end: str | None, window_hours: float | None, policy: str | None) -> dict:
    """One check, stage by stage, each metered: validate the window, measure drift, follow the episode."""
    meters = StageMeters()
    try:
        ctx = open_context(settings)
        start = begin_check(ctx, policy, window_end, window_hours)
        with meters.stage("validate"):
            window = read_window(ctx, start)
    except WindowTooSmall as exc:  # a quiet hour is not a failure: the next check covers this window too
        return quiet_hour(ctx, start, exc)
    except RefitError as exc:
        return user_error(exc)
    with check_run(ctx, start) as run:
        with meters.stage("monitor"):
            result = measure(ctx, start, window)
        with meters.stage("labels"):
            decision = follow_episode(ctx, start, window, result, run.info.run_id)
        verdict = record(ctx, start, window, result, decision, run.info.run_id, meters)
    publish(ctx, window, verdict, result, decision)
    if decision.action == "update":
        try:
            request_update(ctx, start.champion, decision, run.info.run_id)
        except RefitError as exc:
            return user_error(exc)
    return verdict
