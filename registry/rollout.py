"""Rollback in the registry: champion back to previous, the bad version tagged, an MLflow run of why.

Shared by the server's automatic rollback (a guard failed) and the hand-run
``rollback`` flow, so both leave the same record. MlflowClient is used
directly, never ``mlflow.start_run``: the server calls this from a worker
thread while other threads may be inside runs of their own.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from refit import faults, processes
from refit.errors import RefitError
from registry import versions
from registry.tracking import RUN_TYPE, abandoned_runs


def roll_back(model_name: str, bad_version: int | None, reason: str, *, experiment_id: str,
              store=None, source: str = "manual", guard_html: str | None = None, guard_markdown: str | None = None,
              guard_json: dict | None = None, restore_to: int | None = None) -> dict:
    """Make ``previous`` the champion again, if the champion is still ``bad_version``.

    ``bad_version`` None means whatever is champion now (the hand-run path).
    The demoted version is tagged with the reason; ``previous`` is cleared
    (inside the lock, with the alias move), so a second rollback never
    returns to the version just demoted. The guard table, when given, is
    logged with the run. With ``store`` the aliases move under the model's
    promotion lock, fenced by its token, so a rollback never interleaves with
    a promotion. Raises ``RefitError`` when there is nothing to roll back
    to, or the champion has moved on.

    Safe to call again after a failure part-way (the server retries an
    automatic rollback until it lands): with ``restore_to``, a champion that is
    already ``restore_to`` means the aliases moved on an earlier try, and only
    the record is written; a version whose rollback run exists is not
    recorded twice. Before the aliases move, the demoted version is tagged
    with the rollback's intent (``refit.rollback_intent``), so a rollback
    stopped after moving them (SIGKILL) is finished by the next hand-run
    rollback: it writes the record the stopped one never wrote, with that
    one's reason. The record is written before the lock is released: a
    rollback that takes the lock next finds it written, so it never takes a
    live rollback's intent for a stopped one and records it a second time.

    Raises ``versions.LeaseLost`` (a ``LockBusy``: try again) when the lock
    was lost or a later holder fenced it out, never a plain conflict, so an
    automatic rollback is retried rather than given up.
    """
    lock = versions.promotion_lock(store, model_name, f"rollback by {source}") if store is not None else nullcontext()
    with lock as lease:
        _close_abandoned_rollbacks(model_name, experiment_id, source)
        unfinished = _unfinished_rollback(model_name) if bad_version is None and restore_to is None else None
        if unfinished is not None:
            bad_version, target, reason, source = unfinished
            if versions.alias_version(model_name, versions.PREVIOUS) in (target, bad_version):
                _clear_previous(model_name)  # stopped before it cleared previous
        else:
            bad_version, target = _move_aliases_back(model_name, bad_version, restore_to, lease, reason, source)
        result = _record(model_name, bad_version, target, reason, experiment_id, source, guard_html, guard_markdown,
                         guard_json)
        faults.point("rollback.before_release")
    return result


INTENT_TAG = "refit.rollback_intent"


def _close_abandoned_rollbacks(model_name: str, experiment_id: str, found_by: str) -> list[str]:
    """Rollback runs left RUNNING by a rollback killed while writing its record (its process gone): closed KILLED."""
    client = MlflowClient()
    closed = [run.info.run_id for run in abandoned_runs(experiment_id, model_name, "rollback")]
    for run_id in closed:
        client.set_tag(run_id, "refit.abandoned", f"left running by a rollback that was killed; closed by {found_by}")
        client.set_terminated(run_id, status="KILLED")
    return closed


def _unfinished_rollback(model_name: str) -> tuple[int, int, str, str] | None:
    """A rollback that moved ``champion`` back and stopped before its record: (demoted, restored, reason, source).

    Found by its intent tag on a version without a rollback run, whose
    target is the champion now.
    """
    champion = versions.alias_version(model_name, versions.CHAMPION)
    if champion is None:
        return None
    for version in MlflowClient().search_model_versions(f"name='{model_name}'"):
        intent = json.loads(version.tags.get(INTENT_TAG) or "{}")
        if intent.get("restore_to") == champion and not version.tags.get("refit.rollback_run_id"):
            return int(version.version), champion, intent.get("reason", "rollback"), intent.get("source", "manual")
    return None


def _clear_previous(model_name: str) -> None:
    try:
        MlflowClient().delete_registered_model_alias(model_name, versions.PREVIOUS)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _move_aliases_back(model_name: str, bad_version: int | None, restore_to: int | None,
                       lease: versions.Lease | None, reason: str, source: str) -> tuple[int, int]:
    """Champion back to previous and ``previous`` cleared, fenced; returns (demoted version, restored version).

    The champion moves first: a crash before ``previous`` is cleared leaves
    ``previous`` naming the champion itself, which a second rollback refuses.
    """
    faults.point("rollback.locked")
    current = versions.alias_version(model_name, versions.CHAMPION)
    target = versions.alias_version(model_name, versions.PREVIOUS)
    if bad_version is not None and restore_to is not None and current == restore_to != bad_version:
        return bad_version, restore_to  # an earlier try moved the aliases; the record is what is missing
    bad_version = current if bad_version is None else bad_version
    if current is None or current != bad_version:
        raise versions.PromotionConflict(
            f"champion of {model_name} is v{current}, not v{bad_version}: nothing to roll back")
    if target is None or target == bad_version:
        where = "unset (a rollback clears it)" if target is None else "the champion itself"
        raise RefitError(f"model {model_name} has no previous champion to roll back to: v{current} is champion "
                         f"and previous is {where}")
    if lease is not None:
        lease.fence(model_name)
    versions.set_tags(model_name, bad_version, {INTENT_TAG: json.dumps(
        {"restore_to": target, "reason": reason[:2000], "source": source})})  # the journal, before anything moves
    versions.set_alias(model_name, versions.CHAMPION, target)
    faults.point("rollback.champion_moved")
    _clear_previous(model_name)
    faults.point("rollback.aliases_moved")
    return bad_version, target


def _record(model_name: str, bad_version: int, target: int, reason: str, experiment_id: str, source: str,
            guard_html: str | None, guard_markdown: str | None, guard_json: dict | None) -> dict:
    client = MlflowClient()
    done = versions.version_tags(model_name, bad_version)
    if done.get("refit.rollback_run_id"):  # recorded by an earlier try
        return {"champion": target, "rolled_back": bad_version, "reason": done.get("refit.rolled_back", reason),
                "run_id": done["refit.rollback_run_id"], "at": done.get("refit.rolled_back_at")}
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    versions.set_tags(model_name, bad_version, {"refit.rolled_back": reason, "refit.deployed": "rolled back",
                                                "refit.rolled_back_by": source, "refit.rolled_back_at": when})
    versions.set_tags(model_name, target, {"refit.deployed": "champion"})

    run = client.create_run(experiment_id, run_name="rollback", tags={
        RUN_TYPE: "rollback", "refit.model": model_name, "refit.rolled_back_version": str(bad_version),
        "refit.restored_version": str(target), "refit.reason": reason[:5000], "refit.rolled_back_by": source,
        "refit.process": processes.identity()})
    run_id = run.info.run_id
    faults.point("rollback.run_created")
    status = "FAILED"
    try:
        if guard_html:
            client.log_text(run_id, guard_html, "guard.html")
        if guard_markdown:
            client.log_text(run_id, guard_markdown, "guard.md")
        if guard_json:
            client.log_text(run_id, json.dumps(guard_json, indent=2, default=str), "guard.json")
            metrics = [Metric(f"{side}_{key}", float(value), int(time.time() * 1000), 0)
                       for side in ("new", "old") for key, value in guard_json.get(side, {}).items()]
            if metrics:
                client.log_batch(run_id, metrics=metrics)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)  # never left RUNNING, whatever failed above
    versions.set_tags(model_name, bad_version, {"refit.rollback_run_id": run_id})
    return {"champion": target, "rolled_back": bad_version, "reason": reason, "run_id": run_id, "at": when}
