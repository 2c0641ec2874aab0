"""Retries for tasks that talk to S3 or MLflow: only what a second try can fix, with backoff.

A refused connection, a timeout, S3 throttling or a 5xx from either service
is retried (three times, 2 s, 4 s, 8 s apart, with jitter); a user's mistake
(``RefitError``), a missing key or a refused promotion is not: retrying those
would only repeat the answer.
"""

from __future__ import annotations

from prefect.tasks import exponential_backoff

S3_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                      "InternalError", "ServiceUnavailable", "500", "502", "503", "504"}
# MLflow's HTTP client already retries 5xx answers itself; these reach us when its retries ran out.
MLFLOW_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED"}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth another try (network, throttling, server-side failures)."""
    from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
    from mlflow.exceptions import MlflowException

    from refit.errors import RefitError

    if isinstance(exc, RefitError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, EndpointConnectionError, ConnectionClosedError,
                        ReadTimeoutError)):
        return True
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code")) in S3_TRANSIENT_CODES
    if isinstance(exc, MlflowException):  # a busy SQLite store says "database is locked"
        return exc.error_code in MLFLOW_TRANSIENT_CODES or "database is locked" in str(exc)
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry the failed run only if its exception is transient."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by the state
        return is_transient(exc)
    return False


RETRY = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2), "retry_jitter_factor": 0.5,
         "retry_condition_fn": retry_transient}
