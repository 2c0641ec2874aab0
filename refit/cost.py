"""Metering and pricing: what an update or a prediction batch really cost.

CPU-seconds are the process's user+system time across all its threads, so on
2 cores a busy minute costs about 120 CPU-seconds. Prices come from settings.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field


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
