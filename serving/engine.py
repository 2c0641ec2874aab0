"""Micro-batching: concurrent requests share forward passes on one inference thread.

Requests wait in a queue while the model is busy; the next pass takes as many
of them as fit in ``batch_size`` texts, grouped by the model that answers
them. One thread runs every pass, so two models (canary and champion) never
fight over the cores, and the event loop stays free for HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from serving.rollout import Slot


@dataclass
class _Job:
    slot: Slot
    texts: list[str]
    future: asyncio.Future = field(repr=False)


class Engine:
    """Answers ``predict(slot, texts)`` by batching concurrent calls.

    ``on_pass(slot, texts, cpu_seconds)`` reports each pass (metrics, cost):
    CPU-seconds are the process's during the pass, which on a busy server is
    mostly the pass itself.
    """

    def __init__(self, batch_size: int, on_pass: Callable[[Slot, int, float], None] | None = None):
        self.batch_size = batch_size
        self.on_pass = on_pass
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine")

    async def predict(self, slot: Slot, texts: list[str]) -> tuple[list[str], np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(slot, texts, future))
        return await future

    async def stop(self) -> None:
        """Finish every queued job, then stop."""
        await self._queue.put(None)
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def _take(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, size, stop = [first], len(first.texts), False
        while size < self.batch_size and not self._queue.empty():
            job = self._queue.get_nowait()
            if job is None:
                stop = True
                break
            jobs.append(job)
            size += len(job.texts)
        return jobs, stop

    def _infer(self, slot: Slot, texts: list[str]) -> tuple[list[str], np.ndarray]:
        cpu = time.process_time()
        labels, confidence = slot.model.predict(texts)
        if self.on_pass is not None:
            self.on_pass(slot, len(texts), time.process_time() - cpu)
        return labels, confidence

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is None:
                return
            jobs, stop = self._take(first)
            by_slot: dict[int, list[_Job]] = {}
            for job in jobs:
                by_slot.setdefault(id(job.slot), []).append(job)
            for group in by_slot.values():
                texts = [t for job in group for t in job.texts]
                try:
                    labels, confidence = await loop.run_in_executor(self._executor, self._infer, group[0].slot, texts)
                except Exception as exc:  # the model failed: those requests fail, the server goes on
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                start = 0
                for job in group:
                    end = start + len(job.texts)
                    if not job.future.done():
                        job.future.set_result((labels[start:end], confidence[start:end]))
                    start = end
            if stop:
                return
