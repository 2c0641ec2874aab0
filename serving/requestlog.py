"""The server's request log: every answered prediction, buffered and written as Parquet parts.

Rows go to ``inference/`` through ``refit.requestlog.write_inference``, the
layout the monitor reads. A part is written when the buffer holds
``flush_rows`` rows or its oldest row is ``flush_seconds`` old, and on
shutdown. A failed write keeps its rows in the buffer for the next attempt,
so a clean stop loses nothing: rows answered = rows logged.
"""

from __future__ import annotations

import logging
import threading
import time

import pandas as pd

from refit import requestlog
from refit.store import ObjectStore

log = logging.getLogger("refit.serving")


class RequestLog:
    """Thread-safe buffer in front of the object store, flushed by size, by age and on close."""

    def __init__(self, store: ObjectStore, model_name: str, flush_rows: int = 2000, flush_seconds: float = 30.0):
        self.store, self.model_name = store, model_name
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._rows: list[dict] = []
        self._oldest: float | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one writer at a time keeps parts in order
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rows_logged = 0
        self.parts_written = 0
        self.write_failures = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def append(self, rows: list[dict]) -> None:
        """Queue rows (``refit.requestlog.INFERENCE_COLUMNS``); never blocks on the store."""
        with self._lock:
            if not self._rows:
                self._oldest = time.monotonic()
            self._rows.extend(rows)
            full = len(self._rows) >= self.flush_rows
        if full:
            self._wake.set()

    @property
    def buffered(self) -> int:
        return len(self._rows)

    def flush(self) -> int:
        """Write what is buffered as one part per day; returns the rows written."""
        with self._write_lock:
            with self._lock:
                rows, self._rows, self._oldest = self._rows, [], None
            if not rows:
                return 0
            try:
                requestlog.write_inference(self.store, self.model_name,
                                           pd.DataFrame(rows, columns=requestlog.INFERENCE_COLUMNS))
            except Exception:
                with self._lock:  # put them back in front, for the next attempt
                    self._rows = rows + self._rows
                    self._oldest = time.monotonic()
                self.write_failures += 1
                raise
            self.rows_logged += len(rows)
            self.parts_written += 1
            return len(rows)

    def _due(self) -> bool:
        with self._lock:
            return bool(self._rows) and (len(self._rows) >= self.flush_rows
                                         or time.monotonic() - (self._oldest or 0) >= self.flush_seconds)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=min(1.0, self.flush_seconds))
            self._wake.clear()
            if self._due():
                try:
                    self.flush()
                except Exception:
                    log.exception("request log: writing a part failed; its rows stay buffered")
                    self._stop.wait(1.0)

    def close(self, attempts: int = 5) -> None:
        """Stop the flusher and write everything left, retrying a failing store a few times."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for attempt in range(attempts):
            try:
                self.flush()
                return
            except Exception:
                log.exception("request log: final flush failed (attempt %d of %d)", attempt + 1, attempts)
                time.sleep(0.5 * (attempt + 1))
        log.error("request log: %d rows could not be written to %s", self.buffered, self.store.uri("inference/"))
