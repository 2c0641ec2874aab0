"""monitor: validate the newest traffic window, measure drift, follow the episode, decide what to do.

A drifted window opens the model's drift episode or joins it; the open
episode's labels (every one that arrived since it began) decide between
``wait for labels`` and ``update``. When an update can start, the check emits
the Prefect event ``refit.drift.detected``; on a Prefect server the
``update`` deployment is triggered by that event.
"""

from __future__ import annotations

import time
from datetime import timedelta

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.logging import get_run_logger

from flows.common import one_at_a_time, open_context, parse_time, settings_for, user_error
from refit import requestlog
from refit.cost import StageMeters
from refit.errors import RefitError, WindowTooSmall
from refit.policy import chosen_policy, file_hash
from refit.runtime.cascade import student_share
from registry import episodes, versions
from registry.tracking import RUN_TYPE, flat_params, last_checked_window_end, log_policy
from tasks.deploy import read_reference, reference_prefix
from tasks.drift import KeptCalibrations, check_drift, load_drift_policy, reference_as_served
from tasks.episodes import UNSENT, check_markdown, count, decide, follow, record_check  # noqa: F401  (UNSENT: tests read it here)
from tasks.finetune import load_update_policy
from tasks.report import markdown as cost_markdown, model_report
from tasks.validate import validate_window

DRIFT_EVENT = "refit.drift.detected"


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
            return _monitor(settings, window_end, window_hours, policy)
    except RefitError as exc:  # the slot never came free
        return user_error(exc)


def _monitor(settings, window_end: str | None, window_hours: float | None, policy: str | None) -> dict:
    meters = StageMeters()
    try:
        ctx = open_context(settings)
        name = ctx.model_name
        drift_policy, policy_path = load_drift_policy(chosen_policy(policy, settings.drift_policy, "drift",
                                                                    "REFIT_DRIFT_POLICY"))
        update_policy, _ = load_update_policy()
        champion = versions.alias_version(name, versions.CHAMPION)
        if champion is None:
            raise RefitError(f"model {name} has no champion: run bootstrap first")
        start, end = window_bounds(ctx.experiment_id, name, window_end, window_hours)
        with meters.stage("validate"):
            window = requestlog.read_inference(ctx.store, name, start, end)
            validated = validate_window(ctx.store, name, window, drift_policy.min_window_rows, check_schema=True)
            reference, pool = read_reference(ctx.store, name, champion)
    except WindowTooSmall as exc:
        # A quiet hour is not a failure: complete, record nothing, and the next check covers this window too.
        get_run_logger().info(f"{exc}: waiting for more traffic")
        verdict = {"drift_detected": False, "severity": "none", "action": "wait",
                   "action_reason": f"{exc}: waiting for more traffic", "rows_in": len(window),
                   "window_start": start.isoformat(), "window_end": end.isoformat(), "champion_version": champion}
        return verdict | quiet_hour_episode(ctx, champion, update_policy, end)

    except RefitError as exc:
        return user_error(exc)

    uri = requestlog.window_uri(ctx.store, name, start, end)
    tags = {RUN_TYPE: "drift-check", "refit.model": name, "refit.champion_version": str(champion),
            "refit.window_start": start.isoformat(), "refit.window_end": end.isoformat(), "refit.window_uri": uri}
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name="drift-check", tags=tags) as run:
        mlflow.log_params(flat_params("drift", drift_policy) | {"policy_hash": file_hash(policy_path)})
        log_policy(policy_path)
        with meters.stage("monitor"):
            current = with_arrived_labels(ctx.store, name, validated.kept, start, drift_policy)
            # thresholds calibrated on the champion's reference, once, and kept beside it in the store
            result = check_drift(reference_as_served(reference, current), current, drift_policy,
                                 kept=KeptCalibrations.in_store(ctx.store, reference_prefix(name, champion)))
        with meters.stage("labels"):
            decision = follow(ctx.store, ctx.experiment_id, name, result.drift_detected, result.severity,
                              start.isoformat(), end.isoformat(), champion, run.info.run_id,
                              sorted(pool["label"].astype(str).unique()), update_policy, end, ctx.settings.seed)
        verdict = result.to_dict() | decision.to_dict() | {
            "window_start": start.isoformat(), "window_end": end.isoformat(), "window_uri": uri,
            "champion_version": champion, "rows_in": validated.rows_in,
            "rows_quarantined": validated.rows_quarantined, "quarantine_reasons": validated.reasons,
            "drift_run_id": run.info.run_id,
            "student_share": student_share(validated.kept),  # the cascade's cheap tier: a falling share is drift too
        }
        record_check(verdict, result, validated)
        mlflow.log_metrics(meters.metrics(ctx.rates) | {"check_cpu_seconds": meters.whole()})
    create_markdown_artifact(check_markdown(name, verdict, result), key="drift-verdict",
                             description=f"{name} drift check: {decision.action}")
    create_markdown_artifact(cost_markdown([model_report(name, ctx.experiment_id, ctx.store, ctx.settings.cpu_usd_per_hour,
                                                         ctx.settings.monthly_budget_usd)]), key="cost-report",
                             description=f"{name}: cost on one page (refit report)")
    if decision.action == "update":
        payload = {"model_name": name, "episode_id": decision.episode.id, "severity": decision.episode.severity,
                   "model_version": champion, "drift_run_id": run.info.run_id, "labels": decision.labels.usable}
        try:
            emit_then_mark(run.info.run_id, lambda: emit_event(
                DRIFT_EVENT, resource={"prefect.resource.id": f"refit.model.{name}"}, payload=payload),
                mark=lambda: episodes.record_try(decision.episode.id, decision.labels.usable))
        except RefitError as exc:
            return user_error(exc)
    get_run_logger().info(f"drift {'detected' if result.drift_detected else 'not detected'} "
                          f"(severity {result.severity}) on {len(validated.kept)} rows: action {decision.action} "
                          f"({decision.reason})")
    return verdict


def quiet_hour_episode(ctx, champion: int, update_policy, end) -> dict:
    """Too little traffic to measure drift, but labels still arrive: an open episode whose labels now suffice
    starts its update from this check too."""
    name = ctx.model_name
    episode = episodes.open_episode(ctx.experiment_id, name)
    if episode is None:
        return {}
    _, pool = read_reference(ctx.store, name, champion)
    counted = count(ctx.store, ctx.experiment_id, name, episode, sorted(pool["label"].astype(str).unique()),
                    update_policy, end, ctx.settings.seed)
    action, why = decide(episode, counted, update_policy.min_new_examples)
    if action == "update":
        payload = {"model_name": name, "episode_id": episode.id, "severity": episode.severity,
                   "model_version": champion, "drift_run_id": episode.opened_by, "labels": counted.usable}
        try:  # no drift-check run to tag in a quiet hour: only the episode is marked
            emit_then_mark(None, lambda: emit_event(
                DRIFT_EVENT, resource={"prefect.resource.id": f"refit.model.{name}"}, payload=payload),
                mark=lambda: episodes.record_try(episode.id, counted.usable))
        except RefitError as exc:  # the episode stays untried: the next check tries again
            get_run_logger().warning(str(exc))
    return {"action": action, "action_reason": why, "episode": episode.id, "drift_run_id": episode.opened_by,
            "labelled_rows": counted.usable, "labels_enough": counted.ok}


def window_bounds(experiment_id: str, name: str, window_end: str | None, window_hours: float | None):
    """The window to check: ``window_hours`` back from ``window_end`` (default now), or, unset, from where the
    previous check ended (at most 24 hours back), so a window is never measured twice."""
    end = parse_time(window_end)
    start = end - timedelta(hours=window_hours or 24)
    if window_hours is None:
        last = last_checked_window_end(experiment_id, name)
        start = max(start, parse_time(last)) if last else start
    if start >= end:
        raise RefitError(f"window {start.isoformat()} .. {end.isoformat()} is empty: already checked")
    return start, end


def with_arrived_labels(store, name: str, kept, start, drift_policy):
    """The window's rows with their delayed labels, where they have arrived, for the performance signal."""
    if not (drift_policy.performance.enabled and "request_id" in kept.columns):
        return kept
    labels = requestlog.read_labels(store, name, since=start.date())[["request_id", "label"]]
    return kept.merge(labels.drop_duplicates("request_id", keep="last"), on="request_id", how="left")




def emit_then_mark(run_id: str | None, emit, mark=None) -> None:
    """Send the drift event, then tag the check's run ``refit.action = update`` and ``mark`` the episode as tried
    (what the next check's dedupe reads).

    Raises:
        RefitError: the event could not be sent; the run keeps ``UNSENT`` and the episode is not marked, so the
            next check starts the update again.
    """
    from mlflow import MlflowClient

    try:
        sent = emit()
    except Exception as exc:  # the events client: no API, a refused connection
        raise RefitError(f"drift event {DRIFT_EVENT} not sent ({type(exc).__name__}: {exc}); the episode is not marked "
                         "as tried, so the next check will try again") from None
    if sent is None and events_on():
        raise RefitError(f"drift event {DRIFT_EVENT} not sent (the events client refused it; Prefect's log says "
                         "why); the episode is not marked as tried, so the next check will try again")
    if sent is not None and not delivered(sent):
        raise RefitError(f"drift event {DRIFT_EVENT} did not reach the Prefect API (the events client only queues "
                         "it and logs a failure); the episode is not marked as tried, so the next check will try "
                         "again")
    if mark is not None and sent is not None:  # without a server nothing was sent: the update records its own try
        mark()
    if run_id is not None:
        MlflowClient().set_tag(run_id, "refit.action", "update")


def delivered(event, seconds: float = 30.0) -> bool:
    """Whether ``event`` is stored by the Prefect API: the events client only queues it, and a refused
    connection is logged by its worker thread, never raised, so the monitor reads the event back by id."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventIDFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=seconds)
    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            try:
                if client.read_events(EventFilter(id=EventIDFilter(id=[event.id])), limit=1).events:
                    return True
            except Exception:  # noqa: BLE001 - an API that does not answer: not delivered
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)  # the API stores an event a moment after it receives it


def events_on() -> bool:
    """Whether this process sends Prefect events at all (a returned ``None`` is then a failure, not a setting)."""
    from prefect.events.worker import should_emit_events

    return should_emit_events()
