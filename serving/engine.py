"""Micro-batching: concurrent requests share forward passes on one inference thread.

Requests wait in a queue while the model is busy; the next pass takes as many
of them as fit in ``batch_size`` texts (waiting up to ``max_wait`` for more:
a fuller pass costs less per text), grouped by the model that answers them.
One thread runs every pass, so two models (canary and champion) never fight
over the cores, and the event loop stays free for HTTP.

The queue is bounded in texts (``max_queue_texts``): a request that would
overfill it is refused at once with ``Overloaded``, which the app answers as
503 with ``Retry-After``, rather than waiting behind minutes of work. A
request not answered within ``timeout`` seconds is refused the same way and
its texts are skipped if no pass has taken them yet.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from serving.rollout import Slot


class Overloaded(Exception):
    """The server cannot take this request now: the queue is full or the request waited too long."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


@dataclass
class _Job:
    slot: Slot
    texts: list[str]
    future: asyncio.Future = field(repr=False)
    abandoned: bool = False  # its caller timed out: a pass that has not taken it yet skips it


class Engine:
    """Answers ``predict(slot, texts)`` by batching concurrent calls.

    ``on_pass(slot, texts, cpu_seconds)`` reports each pass (metrics, cost):
    CPU-seconds are the process's during the pass, which on a busy server is
    mostly the pass itself.
    """

    def __init__(self, batch_size: int, on_pass: Callable[[Slot, int, float], None] | None = None,
                 max_wait: float = 0.0, max_queue_texts: int | None = None, timeout: float | None = None):
        self.batch_size, self.max_wait = batch_size, max_wait
        self.max_queue_texts, self.timeout = max_queue_texts, timeout
        self.on_pass = on_pass
        self.queued_texts = 0  # texts waiting for a pass (the event loop's thread only: no lock needed)
        self.refused = 0
        self._seconds_per_text = 0.01  # moving average of the pass time, for Retry-After
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine")

    def retry_after(self) -> int:
        """Seconds until the queue has drained, by the recent pass rate: what ``Retry-After`` says."""
        return max(1, math.ceil(self.queued_texts * self._seconds_per_text))

    async def predict(self, slot: Slot, texts: list[str]) -> tuple:
        """Labels and confidences for ``texts`` (and, from a cascade, the tier of each); ``Overloaded`` if the
        queue is full or the answer is late."""
        if self.max_queue_texts is not None and self.queued_texts and \
                self.queued_texts + len(texts) > self.max_queue_texts:
            self.refused += 1
            raise Overloaded(f"the server is at capacity ({self.queued_texts} texts queued, limit "
                             f"{self.max_queue_texts}); retry later", self.retry_after())
        future = asyncio.get_running_loop().create_future()
        job = _Job(slot, texts, future)
        self.queued_texts += len(texts)
        self._queue.put_nowait(job)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            job.abandoned = True
            future.add_done_callback(lambda done: done.cancelled() or done.exception())  # nobody reads it now
            self.refused += 1
            raise Overloaded(f"no answer within {self.timeout:g} s: the server is overloaded; retry later",
                             self.retry_after()) from None

    async def stop(self) -> None:
        """Finish every queued job, then stop."""
        await self._queue.put(None)
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus whatever joins within ``max_wait`` seconds, up to ``batch_size`` texts."""
        jobs, size, deadline = [first], len(first.texts), time.monotonic() + self.max_wait
        while size < self.batch_size:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            if job is None:
                return jobs, True
            jobs.append(job)
            size += len(job.texts)
        return jobs, False

    def _taken(self, jobs: list[_Job]) -> list[_Job]:
        """Jobs leave the queue's count when a pass takes them; a timed-out one is dropped unanswered."""
        self.queued_texts -= sum(len(job.texts) for job in jobs)
        return [job for job in jobs if not job.abandoned]

    def _infer(self, slot: Slot, texts: list[str]) -> tuple:
        """Labels and confidences; a cascade (``predict_tiers``) adds the tier that answered each text."""
        cpu = time.process_time()
        tiers = getattr(slot.model, "predict_tiers", None)
        answer = tiers(texts) if tiers is not None else slot.model.predict(texts)
        if self.on_pass is not None:
            self.on_pass(slot, len(texts), time.process_time() - cpu)
        return answer

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is None:
                return
            jobs, stop = await self._gather(first)
            jobs = self._taken(jobs)
            by_slot: dict[int, list[_Job]] = {}
            for job in jobs:
                by_slot.setdefault(id(job.slot), []).append(job)
            for group in by_slot.values():
                texts = [t for job in group for t in job.texts]
                started = time.perf_counter()
                try:
                    answer = await loop.run_in_executor(self._executor, self._infer, group[0].slot, texts)
                    self._seconds_per_text = (0.8 * self._seconds_per_text
                                              + 0.2 * (time.perf_counter() - started) / len(texts))
                except Exception as exc:  # the model failed: those requests fail, the server goes on
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                start = 0
                for job in group:
                    end = start + len(job.texts)
                    if not job.future.done():
                        job.future.set_result(tuple(part[start:end] for part in answer))
                    start = end
            if stop:
                return
