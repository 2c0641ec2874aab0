"""rollback: put the previous champion back, by hand or when a guard fails."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from flows.common import open_context, user_error
from refit.errors import RefitError
from registry import versions


@flow(name="rollback")
def rollback(reason: str = "manual rollback") -> dict:
    """Move ``champion`` back to ``previous`` and tag the demoted version with ``reason``."""
    try:
        ctx = open_context()
        name = ctx.model_name
        current = versions.alias_version(name, versions.CHAMPION)
        previous = versions.alias_version(name, versions.PREVIOUS)
        if current is None or previous is None:
            raise RefitError(f"model {name} has no previous champion to roll back to")
        versions.promote(name, previous, current)
        versions.set_tags(name, current, {"refit.rolled_back": reason, "refit.deployed": "rolled back"})
    except RefitError as exc:
        return user_error(exc)
    get_run_logger().info(f"rolled back {name}: champion v{current} -> v{previous} ({reason})")
    return {"champion": previous, "rolled_back": current, "reason": reason}
