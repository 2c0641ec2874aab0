"""The server's request log: every answered prediction, buffered and written as Parquet parts.

Rows go to ``inference/`` through ``refit.requestlog.write_inference``, the
layout the monitor reads. A part is written when the buffer holds
``flush_rows`` rows or its oldest row is ``flush_seconds`` old, and on
shutdown.

No row is ever dropped. A part the store refuses (it is down, or full) is
written instead to a local directory laid out like the store (``spill_dir``,
a ``LocalStore``), under the very key it will have in the store, so memory
stays bounded however long the outage lasts. The flusher drains spilled parts
to the store once it answers again, each under its own key: a drain cut short
and done again overwrites, never duplicates. A server restarted on the same
``spill_dir`` drains what the last one left. Rows answered = rows in the
store + rows spilled, at every moment after a flush.

A row is visible at every moment to ``pending_ids`` or to a reader of the
store: a part being written keeps its rows in ``pending_ids`` until the store
(or the spill directory) holds them, and a spilled part leaves the spill
directory only once the store holds it. So a label for a request this
server answered is never taken for a label of an unknown request because it
arrived in the middle of a write.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

import pandas as pd

from refit import faults, requestlog
from refit.store import LocalStore, ObjectStore

log = logging.getLogger("refit.serving")


class RequestLog:
    """Thread-safe buffer in front of the object store, flushed by size, by age and on close."""

    def __init__(self, store: ObjectStore, model_name: str, flush_rows: int = 2000, flush_seconds: float = 30.0,
                 spill_dir: Path | None = None):
        self.store, self.model_name = store, model_name
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.spill = LocalStore(spill_dir) if spill_dir is not None else None
        self._rows: list[dict] = []
        self._writing: list[dict] = []  # the part being written: out of the buffer, not yet in the store
        self._oldest: float | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one writer at a time keeps parts in order
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_drain = 0.0
        self.rows_logged = 0  # rows in the store
        self.parts_written = 0
        self.write_failures = 0
        self.rows_spilled = self._count_spilled()  # rows on local disk, waiting for the store

    @property
    def _prefix(self) -> str:
        return f"inference/model={self.model_name}/"

    def _count_spilled(self) -> int:
        if self.spill is None:
            return 0
        return sum(_parquet_rows(self.spill.get_bytes(key)) for key in self.spill.list(self._prefix))

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
        """Rows answered and not yet in the store or the spill directory (buffered, or being written)."""
        with self._lock:
            return len(self._rows) + len(self._writing)

    def pending_ids(self) -> set[str]:
        """Request ids answered but not in the store yet: buffered, being written, or spilled to local disk.

        Read before the store is: a row that leaves this set meanwhile is already in the store.
        """
        with self._lock:
            ids = {str(row["request_id"]) for row in self._rows}
            ids.update(str(row["request_id"]) for row in self._writing)
        if self.spill is not None:
            for key in self.spill.list(self._prefix):
                try:
                    ids |= set(self.spill.get_parquet(key)["request_id"].astype(str))
                except KeyError:  # drained since the listing: the store holds it now
                    continue
        return ids

    def flush(self) -> int:
        """Write what is buffered as one part per day; returns the rows written to the store.

        If the store refuses the part, its rows go to the spill directory
        (returns 0); only if that fails too do they stay buffered, and the
        error is raised.
        """
        with self._write_lock:
            with self._lock:
                rows, self._rows, self._oldest = self._rows, [], None
                self._writing = rows  # still seen by pending_ids until the store or the spill holds them
            if not rows:
                return 0
            frame = pd.DataFrame(rows, columns=requestlog.INFERENCE_COLUMNS)
            try:
                faults.point("requestlog.flush.writing")
                requestlog.write_inference(self.store, self.model_name, frame)
            except Exception as exc:
                self.write_failures += 1
                try:
                    self._spill(frame, exc)
                except Exception:
                    with self._lock:  # put them back in front, for the next attempt
                        self._rows, self._writing = rows + self._rows, []
                        self._oldest = time.monotonic()
                    raise
                with self._lock:
                    self._writing = []
                return 0
            with self._lock:
                self._writing = []
                self.rows_logged += len(rows)
                self.parts_written += 1
            return len(rows)

    def _spill(self, frame: pd.DataFrame, cause: Exception) -> None:
        if self.spill is None:
            raise cause
        requestlog.write_inference(self.spill, self.model_name, frame)
        self.rows_spilled += len(frame)
        self._next_drain = time.monotonic() + min(self.flush_seconds, 5.0)
        log.warning("request log: the store refused a part (%s: %s); %d rows wait in %s",
                    type(cause).__name__, str(cause)[:200], self.rows_spilled, self.spill.root)

    def drain(self) -> int:
        """Move spilled parts to the store, each under its own key; returns the rows moved.

        Stops at the first part the store refuses (it is still down) and
        raises that error; what moved stays moved.
        """
        if self.spill is None:
            return 0
        moved = 0
        with self._write_lock:
            for key in self.spill.list(self._prefix):
                data = self.spill.get_bytes(key)
                self.store.put_bytes(key, data)
                self.spill.delete(key)
                rows = _parquet_rows(data)
                moved += rows
                self.rows_spilled -= rows
                self.rows_logged += rows
                self.parts_written += 1
        if moved:
            log.info("request log: %d spilled rows drained to %s", moved, self.store.uri(self._prefix))
        return moved

    def _due(self) -> bool:
        with self._lock:
            return bool(self._rows) and (len(self._rows) >= self.flush_rows
                                         or time.monotonic() - (self._oldest or 0) >= self.flush_seconds)

    def _drain_due(self) -> None:
        if not self.rows_spilled or time.monotonic() < self._next_drain:
            return
        try:
            self.drain()
        except Exception as exc:  # still down: try again a little later, at most every flush interval
            self._next_drain = time.monotonic() + min(self.flush_seconds, 5.0)
            log.info("request log: store still refuses spilled parts (%s); %d rows wait", type(exc).__name__,
                     self.rows_spilled)

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
            self._drain_due()

    def close(self, attempts: int = 5) -> None:
        """Stop the flusher and write everything left: to the store, or to the spill directory if it is down."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for attempt in range(attempts):
            try:
                self.flush()
                break
            except Exception:
                log.exception("request log: final flush failed (attempt %d of %d)", attempt + 1, attempts)
                time.sleep(0.5 * (attempt + 1))
        if self.buffered:
            log.error("request log: %d rows could be written neither to %s nor to the spill directory",
                      self.buffered, self.store.uri("inference/"))
        if self.rows_spilled:
            try:
                self.drain()
            except Exception:
                log.warning("request log: %d rows stay in %s until a server on it drains them to the store",
                            self.rows_spilled, self.spill.root if self.spill else "-")


def _parquet_rows(data: bytes) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
