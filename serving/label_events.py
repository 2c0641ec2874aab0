"""``refit.labels.arrived`` to the Prefect API when ``/feedback`` kept labels: the update deployment's trigger.

Serving imports no Prefect: the event is posted over plain HTTP from a
thread, so the event loop never waits on the API.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timezone

from refit.events import LABELS_EVENT
from refit.secrets import mask_uri

log = logging.getLogger("refit.serving")


class LabelEvents:
    """``refit.labels.arrived`` to the Prefect API after ``/feedback`` kept labels: at most one per model a minute.

    The update deployment starts on this event and checks whether the open
    episode's labels suffice; a flood of events would start a flood of flow
    runs, so this process sends at most one per model every ``every``
    seconds. Labels kept in between are not lost: they are announced
    together, in one event at the end of that interval (and when the server
    stops). The event is posted over HTTP (``POST <PREFECT_API_URL>/events``)
    from a thread: serving imports no Prefect, and the event loop never waits
    on the API. Without ``PREFECT_API_URL`` nothing is sent; an API that does
    not answer costs a warning in the log, never the request.
    """

    EVERY_SECONDS = 60.0
    TIMEOUT_SECONDS = 10.0

    def __init__(self, api_url: str | None, every: float = EVERY_SECONDS, send=None, clock=time.monotonic):
        self.api_url = api_url.rstrip("/") if api_url else None
        self.every = every
        self._send = send or self._post
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # model -> when its last event went out
        self._unannounced: dict[str, int] = {}  # model -> labels kept since, not announced yet
        self._timers: dict[str, threading.Timer] = {}

    @classmethod
    def from_env(cls) -> LabelEvents:
        import os

        return cls(os.environ.get("PREFECT_API_URL", "").strip() or None)

    def arrived(self, model_name: str, labels: int) -> None:
        """``labels`` were kept for ``model_name``: announce them now, or with the next event if one went out
        less than ``every`` seconds ago. Returns at once."""
        if not self.api_url or labels <= 0:
            return
        with self._lock:
            self._unannounced[model_name] = self._unannounced.get(model_name, 0) + labels
            if model_name in self._timers:  # an event is due: it carries these labels too
                return
            wait = self._last.get(model_name, -self.every) + self.every - self._clock()
            timer = threading.Timer(max(0.0, wait), self._flush, args=(model_name,))
            timer.daemon = True
            self._timers[model_name] = timer
        timer.start()

    def _flush(self, model_name: str) -> None:
        with self._lock:
            self._timers.pop(model_name, None)
            labels = self._unannounced.pop(model_name, 0)
            if labels:
                self._last[model_name] = self._clock()
        if labels:
            self._deliver(model_name, labels)

    def _deliver(self, model_name: str, labels: int) -> None:
        try:
            self._send(model_name, labels)
        except Exception as exc:  # noqa: BLE001 - urllib's and the network's errors alike: the labels are kept
            log.warning("%s for %s (%d labels) not sent to the Prefect API at %s: %s: %s", LABELS_EVENT,
                        model_name, labels, mask_uri(self.api_url), type(exc).__name__, exc)

    def stop(self) -> None:
        """Announce every label not announced yet, now: a stopping server sends no later event."""
        with self._lock:
            timers, self._timers = list(self._timers.values()), {}
            unannounced, self._unannounced = self._unannounced, {}
        for timer in timers:
            timer.cancel()
        for model_name, labels in unannounced.items():
            self._deliver(model_name, labels)

    def _post(self, model_name: str, labels: int) -> None:
        import base64
        import json
        import os
        import urllib.request

        event = {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(), "event": LABELS_EVENT,
                 "resource": {"prefect.resource.id": f"refit.model.{model_name}"}, "related": [],
                 "payload": {"model_name": model_name, "labels": labels}}
        headers = {"Content-Type": "application/json"}
        if os.environ.get("PREFECT_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['PREFECT_API_KEY']}"
        elif os.environ.get("PREFECT_API_AUTH_STRING"):
            token = base64.b64encode(os.environ["PREFECT_API_AUTH_STRING"].encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        request = urllib.request.Request(f"{self.api_url}/events", data=json.dumps([event]).encode(),
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.TIMEOUT_SECONDS):  # a 4xx or 5xx raises HTTPError
            pass
