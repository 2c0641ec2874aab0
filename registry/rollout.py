"""Rollback in the registry: champion back to previous, the bad version tagged, an MLflow run of why.

Shared by the server's automatic rollback (a guard failed) and the hand-run
``rollback`` flow, so both leave the same record. MlflowClient is used
directly, never ``mlflow.start_run``: the server calls this from a worker
thread while other threads may be inside runs of their own.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from refit.errors import RefitError
from registry import versions
from registry.tracking import RUN_TYPE


def roll_back(model_name: str, bad_version: int | None, reason: str, *, experiment_id: str,
              store=None, source: str = "manual", guard_html: str | None = None, guard_markdown: str | None = None,
              guard_json: dict | None = None) -> dict:
    """Make ``previous`` the champion again, if the champion is still ``bad_version``.

    ``bad_version`` None means whatever is champion now (the hand-run path).
    The demoted version is tagged with the reason; ``previous`` is cleared,
    so a second rollback never returns to the version just demoted. The
    guard table, when given, is logged with the run. With ``store`` the
    aliases move under the model's promotion lock, so a rollback never
    interleaves with a promotion. Raises ``RefitError`` when there is nothing
    to roll back to, or the champion has moved on.
    """
    lock = versions.promotion_lock(store, model_name, f"rollback by {source}") if store is not None else nullcontext()
    with lock:
        bad_version, target = _move_aliases_back(model_name, bad_version)
    return _record(model_name, bad_version, target, reason, experiment_id, source, guard_html, guard_markdown,
                   guard_json)


def _move_aliases_back(model_name: str, bad_version: int | None) -> tuple[int, int]:
    """Champion back to previous, guarded; returns (demoted version, restored version)."""
    current = versions.alias_version(model_name, versions.CHAMPION)
    target = versions.alias_version(model_name, versions.PREVIOUS)
    bad_version = current if bad_version is None else bad_version
    if current is None or current != bad_version:
        raise versions.PromotionConflict(
            f"champion of {model_name} is v{current}, not v{bad_version}: nothing to roll back")
    if target is None or target == bad_version:
        raise RefitError(f"model {model_name} has no previous champion to roll back to")
    versions.promote(model_name, target, expected_champion=bad_version)
    return bad_version, target


def _record(model_name: str, bad_version: int, target: int, reason: str, experiment_id: str, source: str,
            guard_html: str | None, guard_markdown: str | None, guard_json: dict | None) -> dict:
    client = MlflowClient()
    try:
        client.delete_registered_model_alias(model_name, versions.PREVIOUS)
    except MlflowException:
        pass
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    versions.set_tags(model_name, bad_version, {"refit.rolled_back": reason, "refit.deployed": "rolled back",
                                                "refit.rolled_back_by": source, "refit.rolled_back_at": when})
    versions.set_tags(model_name, target, {"refit.deployed": "champion"})

    run = client.create_run(experiment_id, run_name="rollback", tags={
        RUN_TYPE: "rollback", "refit.model": model_name, "refit.rolled_back_version": str(bad_version),
        "refit.restored_version": str(target), "refit.reason": reason[:5000], "refit.rolled_back_by": source})
    run_id = run.info.run_id
    if guard_html:
        client.log_text(run_id, guard_html, "guard.html")
    if guard_markdown:
        client.log_text(run_id, guard_markdown, "guard.md")
    if guard_json:
        client.log_text(run_id, json.dumps(guard_json, indent=2, default=str), "guard.json")
        for side in ("new", "old"):
            for key, value in guard_json.get(side, {}).items():
                client.log_metric(run_id, f"{side}_{key}", float(value))
    client.set_terminated(run_id)
    versions.set_tags(model_name, bad_version, {"refit.rollback_run_id": run_id})
    return {"champion": target, "rolled_back": bad_version, "reason": reason, "run_id": run_id, "at": when}
