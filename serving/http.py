"""Request plumbing every endpoint shares: a bounded body, a bearer token, and how refusals and failures answer.

Failing safe: a refusal is a 4xx naming its problem, a full queue or a late
answer a 503 with ``Retry-After``, and a failure a 500 that names an error
id to find in the server log, never the exception itself.
"""

from __future__ import annotations

import logging
import secrets
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.engine import Overloaded
from serving.metrics import Metrics
from serving.schema import BadRequest

log = logging.getLogger("refit.serving")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` bytes (never read whole into memory)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body is {int(declared):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def authorize(request: Request, token, what: str = "admin endpoints",
              setting: str = "REFIT_SERVE_ADMIN_TOKEN") -> None:
    """Refuse the request unless it carries ``Authorization: Bearer <token>``; refuse all while ``token`` is unset."""
    if token is None:
        raise BadRequest(403, f"{what}: disabled until {setting} is set")
    given = request.headers.get("authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise BadRequest(401, f"{what}: send the header 'Authorization: Bearer <{setting}>'")


def internal_error(metrics: Metrics, what: str, kind: str, exc: Exception) -> JSONResponse:
    """A 500 that names an error id to find in the server log, and nothing of the exception itself."""
    error_id = uuid.uuid4().hex[:12]
    log.error("%s (error id %s)", what, error_id, exc_info=exc)
    metrics.requests.labels("500").inc()
    metrics.errors.labels(kind).inc()
    return JSONResponse({"error": f"{what}: internal error (error id {error_id}; the server log has the details)"},
                        status_code=500)


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Answer a refusal, an overload and an unexpected failure as above, counting each in ``metrics``."""

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        metrics.requests.labels(str(exc.status)).inc()
        metrics.errors.labels("unavailable" if exc.status == 503 else "bad_request").inc()
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        metrics.requests.labels("503").inc()
        metrics.errors.labels("overloaded").inc()
        return JSONResponse({"error": exc.message}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(metrics, "request failed", "internal", exc)
