"""rollback: put the previous champion back by hand; the server does the same on its own when a guard fails."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from flows.common import one_at_a_time, open_context, settings_for, user_error
from refit import faults
from refit.errors import RefitError
from registry.rollout import roll_back
from tasks.deploy import notify_server


@flow(name="rollback")
def rollback(reason: str = "manual rollback", model_name: str | None = None) -> dict:
    """Move ``champion`` back to ``previous``, tag the demoted version with ``reason``, tell the server."""
    try:
        ctx = open_context(settings_for(model_name))
        with one_at_a_time(f"refit-rollback-{ctx.model_name}"):
            result = roll_back(ctx.model_name, None, reason, experiment_id=ctx.experiment_id, store=ctx.store,
                               source="manual")
    except RefitError as exc:
        return user_error(exc)
    faults.point("rollback.recorded")
    server = notify_server(ctx.settings)
    get_run_logger().info(f"rolled back {ctx.model_name}: champion v{result['rolled_back']} -> "
                          f"v{result['champion']} ({reason}); server: {server}")
    return result | {"server": server}
