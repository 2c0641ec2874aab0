"""The monitor stage: which window to check, the check's MLflow run, and the event that starts an update.

A check reads the traffic window, measures drift against the champion's
reference, and follows the model's drift episode (``tasks.episodes``). When
the episode's labels suffice it sends ``refit.drift.detected``; a run is
tagged ``refit.action = update`` only once the Prefect API has the event,
so a check whose event never left is not a trigger and the next check sends
it again.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import mlflow
import pandas as pd
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from refit import requestlog
from refit.errors import RefitError, WindowTooSmall
from refit.policy import chosen_policy, file_hash
from refit.runtime.cascade import student_share
from registry import episodes, versions
from registry.tracking import RUN_TYPE, flat_params, last_checked_window_end, log_policy
from tasks.context import parse_time
from tasks.deploy import read_reference, reference_prefix
from tasks.drift import KeptCalibrations, check_drift, load_drift_policy, reference_as_served
from tasks.episodes import Decision, check_markdown, count, decide, follow, record_check
from tasks.finetune import load_update_policy
from tasks.report import markdown as cost_markdown, model_report
from tasks.validate import Validated, validate_window

DRIFT_EVENT = "refit.drift.detected"


@dataclass(frozen=True)
class CheckStart:
    """What a check starts from: its policies, the champion, and the window's bounds."""

    drift_policy: object  # tasks.drift.DriftPolicy
    policy_path: object
    update_policy: object  # tasks.finetune.UpdatePolicy
    champion: int
    start: datetime
    end: datetime

    def window(self) -> dict:
        return {"window_start": self.start.isoformat(), "window_end": self.end.isoformat(),
                "champion_version": self.champion}


def begin_check(ctx, policy: str | None, window_end: str | None, window_hours: float | None) -> CheckStart:
    """The policies, the champion and the window a check reads.

    Raises:
        RefitError: no champion yet, the policy is not a shipped one, or the window was already checked.
    """
    settings = ctx.settings
    drift_policy, policy_path = load_drift_policy(chosen_policy(policy, settings.drift_policy, "drift",
                                                                "REFIT_DRIFT_POLICY"))
    update_policy, _ = load_update_policy()
    champion = versions.alias_version(ctx.model_name, versions.CHAMPION)
    if champion is None:
        raise RefitError(f"model {ctx.model_name} has no champion: run bootstrap first")
    start, end = window_bounds(ctx.experiment_id, ctx.model_name, window_end, window_hours)
    return CheckStart(drift_policy, policy_path, update_policy, champion, start, end)


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


@dataclass(frozen=True)
class Window:
    """The checked window's validated rows, and the champion's reference and replay pool."""

    validated: Validated
    reference: pd.DataFrame
    pool: pd.DataFrame

    @property
    def known_labels(self) -> list[str]:
        return sorted(self.pool["label"].astype(str).unique())


def read_window(ctx, start: CheckStart) -> Window:
    """Validate the window's served requests (bad rows to quarantine) and read the champion's reference.

    Raises:
        WindowTooSmall: too little traffic to judge yet.
    """
    rows = requestlog.read_inference(ctx.store, ctx.model_name, start.start, start.end)
    try:
        validated = validate_window(ctx.store, ctx.model_name, rows, start.drift_policy.min_window_rows,
                                    check_schema=True)
    except WindowTooSmall as exc:
        exc.rows_in = len(rows)
        raise
    reference, pool = read_reference(ctx.store, ctx.model_name, start.champion)
    return Window(validated, reference, pool)


@contextmanager
def check_run(ctx, start: CheckStart):
    """The check's MLflow run, tagged with its window and logged with its policy."""
    name = ctx.model_name
    uri = requestlog.window_uri(ctx.store, name, start.start, start.end)
    tags = {RUN_TYPE: "drift-check", "refit.model": name, "refit.champion_version": str(start.champion),
            "refit.window_start": start.start.isoformat(), "refit.window_end": start.end.isoformat(),
            "refit.window_uri": uri}
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name="drift-check", tags=tags) as run:
        mlflow.log_params(flat_params("drift", start.drift_policy) | {"policy_hash": file_hash(start.policy_path)})
        log_policy(start.policy_path)
        yield run


def measure(ctx, start: CheckStart, window: Window):
    """Drift of the window against the champion's reference, as served, with the labels that have arrived.

    The thresholds are calibrated on the champion's reference once and kept beside it in the store.
    """
    current = with_arrived_labels(ctx.store, ctx.model_name, window.validated.kept, start.start, start.drift_policy)
    return check_drift(reference_as_served(window.reference, current), current, start.drift_policy,
                       kept=KeptCalibrations.in_store(ctx.store, reference_prefix(ctx.model_name, start.champion)))


def with_arrived_labels(store, name: str, kept, start, drift_policy):
    """The window's rows with their delayed labels, where they have arrived, for the performance signal."""
    if not (drift_policy.performance.enabled and "request_id" in kept.columns):
        return kept
    labels = requestlog.read_labels(store, name, since=start.date())[["request_id", "label"]]
    return kept.merge(labels.drop_duplicates("request_id", keep="last"), on="request_id", how="left")


def follow_episode(ctx, start: CheckStart, window: Window, result, run_id: str) -> Decision:
    """Open or join the drift episode, count its labels, and decide: none, wait for labels, or update."""
    return follow(ctx.store, ctx.experiment_id, ctx.model_name, result.drift_detected, result.severity,
                  start.start.isoformat(), start.end.isoformat(), start.champion, run_id, window.known_labels,
                  start.update_policy, start.end, ctx.settings.seed)


def record(ctx, start: CheckStart, window: Window, result, decision: Decision, run_id: str, meters) -> dict:
    """The check's verdict, logged on its run with its metrics, report and cost."""
    validated = window.validated
    verdict = result.to_dict() | decision.to_dict() | start.window() | {
        "window_uri": requestlog.window_uri(ctx.store, ctx.model_name, start.start, start.end),
        "rows_in": validated.rows_in, "rows_quarantined": validated.rows_quarantined,
        "quarantine_reasons": validated.reasons, "drift_run_id": run_id,
        "student_share": student_share(validated.kept),  # the cascade's cheap tier: a falling share is drift too
    }
    record_check(verdict, result, validated)
    mlflow.log_metrics(meters.metrics(ctx.rates) | {"check_cpu_seconds": meters.whole()})
    return verdict


def publish(ctx, window: Window, verdict: dict, result, decision: Decision) -> None:
    """The drift verdict and the cost page as Prefect artifacts, and a log line."""
    name = ctx.model_name
    create_markdown_artifact(check_markdown(name, verdict, result), key="drift-verdict",
                             description=f"{name} drift check: {decision.action}")
    create_markdown_artifact(cost_markdown([model_report(name, ctx.experiment_id, ctx.store,
                                                         ctx.settings.cpu_usd_per_hour,
                                                         ctx.settings.monthly_budget_usd)]),
                             key="cost-report", description=f"{name}: cost on one page (refit report)")
    get_run_logger().info(f"drift {'detected' if result.drift_detected else 'not detected'} "
                          f"(severity {result.severity}) on {len(window.validated.kept)} rows: "
                          f"action {decision.action} ({decision.reason})")


def request_update(ctx, champion: int, decision: Decision, run_id: str) -> None:
    """Send the event that starts the episode's update, then mark the run and the episode.

    Raises:
        RefitError: the event was not delivered; nothing is marked, so the next check sends it again.
    """
    emit_then_mark(run_id, lambda: _emit(ctx.model_name, decision.episode, champion, run_id, decision.labels.usable),
                   mark=lambda: episodes.record_try(decision.episode.id, decision.labels.usable))


def quiet_hour(ctx, start: CheckStart, why: RefitError) -> dict:
    """Too little traffic to measure drift: a completed check (action ``wait``) that records no window.

    Labels still arrive in a quiet hour, so an open episode whose labels now
    suffice starts its update from this check too.
    """
    get_run_logger().info(f"{why}: waiting for more traffic")
    verdict = {"drift_detected": False, "severity": "none", "action": "wait",
               "action_reason": f"{why}: waiting for more traffic", "rows_in": getattr(why, "rows_in", 0)}
    return verdict | start.window() | quiet_hour_episode(ctx, start.champion, start.update_policy, start.end)


def quiet_hour_episode(ctx, champion: int, update_policy, end) -> dict:
    """The open episode's count in a quiet hour, and its update started if its labels now suffice."""
    name = ctx.model_name
    episode = episodes.open_episode(ctx.experiment_id, name)
    if episode is None:
        return {}
    _, pool = read_reference(ctx.store, name, champion)
    counted = count(ctx.store, ctx.experiment_id, name, episode, sorted(pool["label"].astype(str).unique()),
                    update_policy, end, ctx.settings.seed)
    action, why = decide(episode, counted, update_policy.min_new_examples)
    if action == "update":
        try:  # no drift-check run to tag in a quiet hour: only the episode is marked
            emit_then_mark(None, lambda: _emit(name, episode, champion, episode.opened_by, counted.usable),
                           mark=lambda: episodes.record_try(episode.id, counted.usable))
        except RefitError as exc:  # the episode stays untried: the next check tries again
            get_run_logger().warning(str(exc))
    return {"action": action, "action_reason": why, "episode": episode.id, "drift_run_id": episode.opened_by,
            "labelled_rows": counted.usable, "labels_enough": counted.ok}


def _emit(name: str, episode, champion: int, drift_run_id: str | None, labels: int):
    """The drift event the update's trigger reads: the model, its episode and the check that found the drift."""
    from prefect.events import emit_event

    payload = {"model_name": name, "episode_id": episode.id, "severity": episode.severity,
               "model_version": champion, "drift_run_id": drift_run_id, "labels": labels}
    return emit_event(DRIFT_EVENT, resource={"prefect.resource.id": f"refit.model.{name}"}, payload=payload)


def emit_then_mark(run_id: str | None, emit, mark=None) -> None:
    """Send the drift event, then tag the check's run ``refit.action = update`` and ``mark`` the episode as tried
    (what the next check's dedupe reads).

    Raises:
        RefitError: the event could not be sent; the run keeps ``tasks.episodes.EVENT_NOT_SENT`` and the episode
            is not marked, so the next check starts the update again.
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
