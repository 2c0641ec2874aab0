"""What every stage works in: settings, the object store, MLflow's experiment and prices, opened once per run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from refit.cost import Rates
from refit.errors import RefitError
from refit.settings import Settings, settings_error
from refit.store import ObjectStore, open_store
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
