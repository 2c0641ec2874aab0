"""``POST /feedback``: labels from a team's labelling process, checked, rate-limited and announced.

Bearer ``REFIT_SERVE_FEEDBACK_TOKEN``; refused while it is unset. Each label
is checked as ``refit labels import`` checks it (``refit.labels``). Each
caller may send ``REFIT_SERVE_FEEDBACK_LABELS_PER_MINUTE`` labels a minute
(``FeedbackQuota``); accepted labels are announced to the Prefect API
(``serving.label_events``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from refit.errors import RefitError
from serving.http import authorize, read_body
from serving.label_events import LabelEvents
from serving.schema import BadRequest, load_json, valid_unicode

if TYPE_CHECKING:
    from serving.app import Server


class FeedbackQuota:
    """Labels per caller per minute on /feedback: a token bucket per client address, a minute's worth deep."""

    ENV = "REFIT_SERVE_FEEDBACK_LABELS_PER_MINUTE"
    DEFAULT = 6000

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (labels left, when counted)
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> FeedbackQuota:
        import os

        value = os.environ.get(cls.ENV, "").strip()
        if value and not (value.isdigit() and int(value) > 0):
            raise RefitError(f"{cls.ENV} must be a whole number of labels above 0, not {value!r}")
        return cls(int(value) if value else cls.DEFAULT)

    def take(self, caller: str, labels: int) -> tuple[str, int] | None:
        """None if ``caller`` may send ``labels`` now (they are counted), else (the refusal, seconds to wait)."""
        if labels > self.per_minute:
            return (f"/feedback: {labels:,} labels in one call; a caller may send at most {self.per_minute:,} a "
                    f"minute ({self.ENV}): split the batch", 60)
        now = time.monotonic()
        with self._lock:
            left, then = self._buckets.get(caller, (float(self.per_minute), now))
            left = min(float(self.per_minute), left + (now - then) * self.per_minute / 60)
            if left < labels:
                self._buckets[caller] = (left, now)
                wait = max(1, round((labels - left) * 60 / self.per_minute + 0.5))
                return (f"/feedback: rate limit of {self.per_minute:,} labels a minute per caller ({self.ENV}) "
                        f"reached by {caller}; retry in {wait} s", wait)
            self._buckets[caller] = (left - labels, now)
            if len(self._buckets) > 10_000:  # forget callers whose bucket has refilled
                full = [c for c, (_, t) in self._buckets.items() if now - t > 60]
                for c in full:
                    self._buckets.pop(c, None)
        return None


def parse_feedback(body: bytes):
    """The /feedback body as a frame of labels; a malformed body is a 4xx naming the problem."""
    import pandas as pd

    data = load_json(body)
    if not isinstance(data, dict) or set(data) != {"labels"} or not isinstance(data["labels"], list):
        raise BadRequest(422, 'body must be {"labels": [{"request_id": "...", "label": "..."}, ...]}')
    if not data["labels"]:
        raise BadRequest(422, "labels is empty")
    allowed = {"request_id", "label", "text"}
    for i, item in enumerate(data["labels"]):
        if not isinstance(item, dict) or not set(item) <= allowed or "label" not in item:
            raise BadRequest(422, f"labels[{i}] must be an object with label and request_id (or text)")
        if not all(v is None or isinstance(v, str) for v in item.values()):
            raise BadRequest(422, f"labels[{i}]: request_id, label and text must be strings")
        if not all(v is None or valid_unicode(v) for v in item.values()):
            raise BadRequest(422, f"labels[{i}]: not valid Unicode (a lone surrogate escape such as \\ud800)")
    frame = pd.DataFrame(data["labels"])
    for column in ("request_id", "text"):
        if column not in frame.columns:
            frame[column] = None
    return frame


async def handle_feedback(server: Server, quota: FeedbackQuota, request: Request,
                          events: LabelEvents) -> JSONResponse:
    """``POST /feedback``: labels from a team's labelling process.

    Bearer ``REFIT_SERVE_FEEDBACK_TOKEN``; refused while it is unset. Each
    label is checked as ``refit labels import`` checks it (``refit.labels``):
    a request id this server still buffers counts as served, one not visible
    yet (another replica's buffer) waits. Each caller (client address) may
    send ``REFIT_SERVE_FEEDBACK_LABELS_PER_MINUTE`` labels a minute; more is a
    429 with ``Retry-After``, since every label costs the server a look into
    the request log. Accepted labels are announced to the Prefect API
    (``LabelEvents``), so the update flow can check whether they suffice.
    """
    settings = server.settings
    authorize(request, settings.serve_feedback_token, "/feedback", "REFIT_SERVE_FEEDBACK_TOKEN")
    rows = parse_feedback(await read_body(request, server.limits.max_body_bytes))
    refused = quota.take(request.client.host if request.client else "unknown", len(rows))
    if refused is not None:
        server.metrics.requests.labels("429").inc()
        server.metrics.errors.labels("rate_limited").inc()
        return JSONResponse({"error": refused[0]}, status_code=429, headers={"Retry-After": str(refused[1])})
    from refit.labels import import_labels

    result = await asyncio.to_thread(import_labels, server.store, settings.model_name, rows, source="feedback",
                                     buffered_ids=server.request_log.pending_ids(),
                                     max_text_chars=settings.serve_max_text_chars)
    events.arrived(settings.model_name, result.accepted + result.earlier.kept)
    return JSONResponse(result.to_dict())


def add_feedback_route(app: FastAPI, server: Server, events: LabelEvents) -> None:
    """``POST /feedback`` on ``app``, with the caller quota read from the environment now."""
    quota = FeedbackQuota.from_env()

    @app.post("/feedback")
    async def feedback(request: Request) -> JSONResponse:
        """{"labels": [{"request_id": "...", "label": "..."}]} -> {"accepted", "waiting", "quarantined", "reasons"}."""
        return await handle_feedback(server, quota, request, events)
