"""monitor: validate the newest traffic window, measure drift, decide what to do.

When an update is warranted it emits the Prefect event ``refit.drift.detected``;
on a Prefect server the ``update`` deployment is triggered by that event.
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
from refit.errors import RefitError, WindowTooSmall
from refit.policy import chosen_policy, file_hash
from tasks.report import markdown as cost_markdown, model_report
from registry import versions
from registry.tracking import (RUN_TYPE, flat_params, last_checked_window_end, log_json, log_policy,
                               update_triggers)
from refit.runtime.cascade import student_share
from tasks.deploy import read_reference
from tasks.drift import check_drift, decide_action, load_drift_policy, reference_as_served
from tasks.finetune import load_update_policy
from tasks.ingest import labelled_window
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
    try:
        ctx = open_context(settings)
        name = ctx.model_name
        drift_policy, policy_path = load_drift_policy(chosen_policy(policy, settings.drift_policy, "drift",
                                                                    "REFIT_DRIFT_POLICY"))
        update_policy, _ = load_update_policy()
        champion = versions.alias_version(name, versions.CHAMPION)
        if champion is None:
            raise RefitError(f"model {name} has no champion: run bootstrap first")
        end = parse_time(window_end)
        start = end - timedelta(hours=window_hours or 24)
        if window_hours is None:
            last = last_checked_window_end(ctx.experiment_id, name)
            start = max(start, parse_time(last)) if last else start
        if start >= end:
            raise RefitError(f"window {start.isoformat()} .. {end.isoformat()} is empty: already checked")
        window = requestlog.read_inference(ctx.store, name, start, end)
        validated = validate_window(ctx.store, name, window, drift_policy.min_window_rows, check_schema=True)
        reference, _ = read_reference(ctx.store, name, champion)
    except WindowTooSmall as exc:
        # A quiet hour is not a failure: complete, record nothing, and the next check covers this window too.
        get_run_logger().info(f"{exc}: waiting for more traffic")
        return {"drift_detected": False, "severity": "none", "action": "wait",
                "action_reason": f"{exc}: waiting for more traffic", "rows_in": len(window),
                "window_start": start.isoformat(), "window_end": end.isoformat(), "champion_version": champion}
    except RefitError as exc:
        return user_error(exc)

    uri = requestlog.window_uri(ctx.store, name, start, end)
    tags = {RUN_TYPE: "drift-check", "refit.model": name, "refit.champion_version": str(champion),
            "refit.window_start": start.isoformat(), "refit.window_end": end.isoformat(), "refit.window_uri": uri}
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name="drift-check", tags=tags) as run:
        mlflow.log_params(flat_params("drift", drift_policy) | {"policy_hash": file_hash(policy_path)})
        log_policy(policy_path)
        current = validated.kept
        if drift_policy.performance.enabled and "request_id" in current.columns:
            # delayed labels, where they have arrived, for the performance signal
            labels = requestlog.read_labels(ctx.store, name, since=start.date())[["request_id", "label"]]
            current = current.merge(labels.drop_duplicates("request_id", keep="last"), on="request_id", how="left")
        result = check_drift(reference_as_served(reference, current), current, drift_policy)
        labelled = len(labelled_window(ctx.store, name, start, end)) if result.drift_detected else 0
        action, why = decide_action(result, start.isoformat(), end.isoformat(), labelled,
                                    update_policy.min_new_examples, update_triggers(ctx.experiment_id, name, champion),
                                    drift_policy.cooldown_minutes)
        verdict = result.to_dict() | {
            "action": action, "action_reason": why, "window_start": start.isoformat(), "window_end": end.isoformat(),
            "window_uri": uri, "champion_version": champion, "labelled_rows": labelled,
            "rows_in": validated.rows_in, "rows_quarantined": validated.rows_quarantined,
            "quarantine_reasons": validated.reasons, "drift_run_id": run.info.run_id,
            "student_share": student_share(validated.kept),  # the cascade's cheap tier: a falling share is drift too
        }
        metrics = {f"signal_{n}": s.value for n, s in result.signals.items()}
        metrics |= {"rows_in": validated.rows_in, "rows_kept": len(validated.kept),
                    "rows_quarantined": validated.rows_quarantined, "drift_detected": float(result.drift_detected),
                    "labelled_rows": labelled} | ({"student_share": verdict["student_share"]}
                                                  if verdict["student_share"] is not None else {})
        mlflow.log_metrics(metrics)
        mlflow.log_text(result.report_html, "drift_report.html")
        log_json(verdict, "verdict.json")
        # An update is marked on the run only once its event is out (below): a check whose event never left
        # is not a trigger, so the next check of the window tries again instead of deduplicating it forever.
        mlflow.set_tags({"refit.drift_detected": str(result.drift_detected), "refit.severity": result.severity,
                         "refit.action": UNSENT if action == "update" else action})
    create_markdown_artifact(_markdown(name, verdict, result), key="drift-verdict",
                             description=f"{name} drift check: {action}")
    create_markdown_artifact(cost_markdown([model_report(name, ctx.experiment_id, ctx.store, ctx.settings.cpu_usd_per_hour,
                                                         ctx.settings.monthly_budget_usd)]), key="cost-report",
                             description=f"{name}: cost on one page (refit report)")
    if action == "update":
        payload = {"model_name": name, "window_start": start.isoformat(), "window_end": end.isoformat(),
                   "window_uri": uri, "severity": result.severity, "model_version": champion,
                   "drift_run_id": run.info.run_id}
        try:
            emit_then_mark(run.info.run_id, lambda: emit_event(
                DRIFT_EVENT, resource={"prefect.resource.id": f"refit.model.{name}"}, payload=payload))
        except RefitError as exc:
            return user_error(exc)
    get_run_logger().info(f"drift {'detected' if result.drift_detected else 'not detected'} "
          f"(severity {result.severity}) on {len(validated.kept)} rows: action {action} ({why})")
    return verdict


UNSENT = "update (event not sent)"


def emit_then_mark(run_id: str, emit) -> None:
    """Send the drift event, then tag the check's run ``refit.action = update`` (what dedupe and cooldown read).

    Raises:
        RefitError: the event could not be sent; the run keeps ``UNSENT``, so the window is not deduplicated.
    """
    from mlflow import MlflowClient

    try:
        sent = emit()
    except Exception as exc:  # the events client: no API, a refused connection
        raise RefitError(f"drift event {DRIFT_EVENT} not sent ({type(exc).__name__}: {exc}); the window is not "
                         "marked as updated, so the next check will try again") from None
    if sent is None and events_on():
        raise RefitError(f"drift event {DRIFT_EVENT} not sent (the events client refused it; Prefect's log says "
                         "why); the window is not marked as updated, so the next check will try again")
    if sent is not None and not delivered(sent):
        raise RefitError(f"drift event {DRIFT_EVENT} did not reach the Prefect API (the events client only queues "
                         "it and logs a failure); the window is not marked as updated, so the next check will try "
                         "again")
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


def _markdown(name: str, verdict: dict, result) -> str:
    rows = "".join(
        f"| {s.name} | {s.value:.4f} | {s.direction} {s.threshold} | {'**yes**' if s.drifted else 'no'} |\n"
        for s in result.signals.values())
    return (f"# Drift check for {name}: {'DRIFT' if result.drift_detected else 'no drift'}\n\n"
            f"Severity **{result.severity}**, action **{verdict['action']}** ({verdict['action_reason']}). Window `{verdict['window_uri']}`: "
            f"{verdict['rows_in']} rows in, {verdict['rows_quarantined']} quarantined, "
            f"{verdict['labelled_rows']} labelled.\n\n"
            f"| signal | value | threshold | drifted |\n|---|---|---|---|\n{rows}")
