"""What every flow sets up: settings, the object store, MLflow and prices."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

from prefect.logging import get_run_logger
from prefect.states import Failed, State

from refit.cost import Rates
from refit.errors import RefitError
from refit.settings import Settings, settings_error
from refit.store import ObjectStore, open_store
from tasks.ingest import on_prefect_server  # noqa: F401  (flows import it from here)
from registry.tracking import configure


@dataclass(frozen=True)
class Context:
    settings: Settings
    store: ObjectStore
    experiment_id: str
    rates: Rates

    @property
    def model_name(self) -> str:
        return self.settings.model_name


class _UserErrorsWithoutTraceback(logging.Filter):
    """A RefitError is the user's to fix: log its sentence, not the engine's traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RefitError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorsWithoutTraceback) for f in logger.filters):
            logger.addFilter(_UserErrorsWithoutTraceback())


def settings_for(model_name: str | None = None) -> Settings:
    """Settings from the environment, for ``model_name`` when given (a deployment's or the event's model).

    Raises:
        RefitError: the settings (or the name) are invalid, in one line.
    """
    try:
        return Settings(**({"model_name": model_name} if model_name else {}))
    except Exception as exc:  # pydantic's ValidationError: one line
        raise RefitError(f"invalid settings: {settings_error(exc)}") from None


def open_context(settings: Settings | None = None) -> Context:
    """Settings (from the environment by default), then the store and MLflow they name."""
    _quiet_user_errors()
    settings = settings or Settings()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    store = open_store(settings)
    experiment_id = configure(settings)
    return Context(settings, store, experiment_id, Rates(settings.cpu_usd_per_hour, settings.gpu_usd_per_hour))


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


def parse_time(value: str | datetime | None) -> datetime:
    """An ISO time (naive means UTC), or now."""
    if value is None:
        return datetime.now(timezone.utc)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise RefitError(f"not an ISO time: {value!r}") from exc
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
