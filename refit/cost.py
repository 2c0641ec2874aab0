"""Metering and pricing: what an update or a prediction batch really cost.

CPU-seconds are the process's user+system time across all its threads, so on
2 cores a busy minute costs about 120 CPU-seconds. A stage's meter also counts
the processes the flow started (``cpu_seconds_used``). Prices come from
settings.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Rates:
    cpu_usd_per_hour: float
    gpu_usd_per_hour: float

    def price(self, cpu_seconds: float, gpu_seconds: float = 0.0) -> float:
        return cpu_seconds / 3600 * self.cpu_usd_per_hour + gpu_seconds / 3600 * self.gpu_usd_per_hour


@dataclass
class Meter:
    """Context manager measuring wall time, CPU time and peak memory of a block.

    GPU-seconds are the wall time of the block when it ran on a GPU.
    """

    on_gpu: bool = False
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    _start: tuple[float, float] = field(default=(0.0, 0.0), repr=False)

    def __enter__(self) -> Meter:
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc) -> None:
        wall0, cpu0 = self._start
        self.wall_seconds = time.perf_counter() - wall0
        self.cpu_seconds = time.process_time() - cpu0
        self.gpu_seconds = self.wall_seconds if self.on_gpu else 0.0
        self.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class TrainingCost:
    """The metered facts of one training run and their price."""

    wall_seconds: float
    cpu_seconds: float
    gpu_seconds: float
    peak_rss_mb: float
    examples_seen: int
    tokens_seen: int
    usd: float

    @classmethod
    def from_meter(cls, meter: Meter, rates: Rates, examples: int, tokens: int) -> TrainingCost:
        return cls(
            wall_seconds=round(meter.wall_seconds, 3),
            cpu_seconds=round(meter.cpu_seconds, 3),
            gpu_seconds=round(meter.gpu_seconds, 3),
            peak_rss_mb=round(meter.peak_rss_mb, 1),
            examples_seen=examples,
            tokens_seen=tokens,
            usd=round(rates.price(meter.cpu_seconds, meter.gpu_seconds), 6),
        )

    def metrics(self, prefix: str = "train_") -> dict[str, float]:
        return {f"{prefix}{k}" if k != "usd" else f"{prefix}cost_usd": float(v) for k, v in asdict(self).items()}


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _descendant_cpu_seconds(pid: int) -> float:
    """CPU of a live process and of the children it reaped, from ``/proc/<pid>/stat`` (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(v) for v in fields[11:15]) / _TICKS  # utime, stime, cutime, cstime


def cpu_seconds_used() -> float:
    """CPU-seconds this process has used so far: every thread, the children it reaped, and every live
    descendant (a temporary Prefect API, a worker pool), so a stage that starts helpers pays for them too."""
    from refit.processes import descendants

    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    if Path("/proc").is_dir():
        total += sum(_descendant_cpu_seconds(pid) for pid in descendants(os.getpid()))
    return total


@dataclass
class StageMeters:
    """CPU and wall seconds per stage of a flow, by ``with meters.stage("train"): ...``.

    Stages add up when a stage runs more than once (one per rung of the
    ladder); they must not nest. ``whole()`` is everything since the meters
    were made, stages or not: what the flow cost.
    """

    cpu: dict[str, float] = field(default_factory=dict)
    wall: dict[str, float] = field(default_factory=dict)
    _began: tuple[float, float] = field(default_factory=lambda: (time.perf_counter(), cpu_seconds_used()), repr=False)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall0, cpu0 = time.perf_counter(), cpu_seconds_used()
        try:
            yield
        finally:
            self.cpu[name] = round(self.cpu.get(name, 0.0) + cpu_seconds_used() - cpu0, 3)
            self.wall[name] = round(self.wall.get(name, 0.0) + time.perf_counter() - wall0, 3)

    def whole(self) -> float:
        return round(cpu_seconds_used() - self._began[1], 3)

    def metrics(self, rates: Rates | None = None) -> dict[str, float]:
        """``stage_cpu_seconds.<stage>`` (and ``stage_cost_usd.<stage>`` at ``rates``) for MLflow."""
        out = {f"stage_cpu_seconds.{k}": v for k, v in self.cpu.items()}
        if rates is not None:
            out |= {f"stage_cost_usd.{k}": round(rates.price(v), 8) for k, v in self.cpu.items()}
        return out
