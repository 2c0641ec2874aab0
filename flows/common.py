"""What every flow sets up: its settings, one run at a time per model, and a user error ended without a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.logging import get_run_logger
from prefect.states import Failed, State

from refit.errors import RefitError
from tasks.context import Context, open_context, parse_time, settings_for  # noqa: F401  (flows import them from here)
from tasks.ingest import on_prefect_server  # noqa: F401  (flows import it from here)


# The slot's lease: renewed every 90 s while the update runs (30 s to spare for a slow server), so a killed
# update frees it within about 2 minutes.
LEASE_SECONDS = 120


@contextmanager
def one_at_a_time(name: str, timeout_seconds: float = 3600) -> Iterator[None]:
    """Hold Prefect's global concurrency limit ``name`` (one slot, created if missing) on a Prefect server.

    Deployment concurrency limits are per deployment; the update and hotfix
    deployments run the same flow, so the per-model limit is taken here.
    Only against a Prefect server (``PREFECT_API_URL``): Prefect keeps slot
    leases in the server's memory, so a process killed while running on its
    own temporary API would leave the slot taken for good. Embedded runs rely
    on the store's promotion lock and the guarded alias instead: two of them
    at once may both train, but only one promotes. A holder killed on a server
    frees the slot when its lease (``LEASE_SECONDS``) runs out unrenewed.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    if not on_prefect_server():
        yield
        return
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except Exception:  # another run created it first (409)
                client.read_global_concurrency_limit_by_name(name)
    acquired = False
    try:
        with concurrency(name, occupy=1, strict=True, timeout_seconds=timeout_seconds, lease_duration=LEASE_SECONDS):
            acquired = True
            yield
    except TimeoutError:
        if acquired:  # the update's own timeout, not the wait for the slot
            raise
        raise RefitError(
            f"another run has held the concurrency limit {name} for over {timeout_seconds / 60:.0f} min; "
            f"if none is running (a server restart forgets leases), free it: "
            f"prefect gcl update {name} --active-slots 0") from None


def user_error(exc: RefitError) -> State:
    """End the flow Failed with the one-line reason, without a traceback."""
    get_run_logger().error("%s", exc)
    return Failed(message=str(exc))
