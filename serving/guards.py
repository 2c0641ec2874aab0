"""Rollout policy and live guards: is the new champion at least as healthy as the old one?

Plain logic with no server or MLflow in it: the server feeds each model's
live figures into ``LiveStats`` and asks ``judge`` for a verdict, which, like
the promotion gate's, lists every guard with its value, limit and result.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from refit.policy import StrictModel, load_policy
from refit.verdict import Rule, RuleVerdict, at_least, at_most, html_page, html_table, markdown_table, ratio


class Guards(StrictModel):
    """Limits on the new version relative to the old one over the same window."""

    max_error_rate_increase: float = Field(ge=0, description="New minus old error rate, in fractions.")
    max_latency_p95_ratio: float = Field(gt=0, description="New p95 request latency / old.")
    min_confidence_ratio: float = Field(ge=0, description="New mean confidence / old.")
    max_cost_per_1k_ratio: float = Field(gt=0, description="New inference cost per 1,000 predictions / old.")


class RolloutPolicy(StrictModel):
    """How a new champion reaches traffic and what rolls it back (``refit/policies/rollout.yaml``)."""

    mode: Literal["canary", "shadow", "direct"]
    canary_share: float = Field(gt=0, le=1)
    window_seconds: float = Field(gt=0)
    min_requests: int = Field(ge=1)
    check_every_seconds: float = Field(gt=0)
    watch_seconds: float = Field(ge=0)
    guards: Guards


def load_rollout_policy(name_or_path: str = "rollout") -> tuple[RolloutPolicy, Path]:
    return load_policy(RolloutPolicy, name_or_path)


@dataclass(frozen=True)
class Figures:
    """One model's live figures over a window."""

    requests: int
    errors: int
    predictions: int
    latency_p50_ms: float
    latency_p95_ms: float
    mean_confidence: float
    cpu_seconds_per_1k: float
    cost_per_1k_usd: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class LiveStats:
    """Thread-safe running figures of one model since ``reset``: what the guards compare.

    Latencies keep the newest 20,000 requests, enough for a p95 over any
    window the policy allows at the rates one server sees.
    """

    def __init__(self, cpu_usd_per_hour: float):
        self._price = cpu_usd_per_hour / 3600
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.since = time.monotonic()
            self._requests = self._errors = self._predictions = 0
            self._confidence_sum = self._cpu_seconds = 0.0
            self._latencies: deque[float] = deque(maxlen=20_000)

    def record_request(self, latency_s: float, confidences: np.ndarray | None) -> None:
        """A request this model answered (``confidences``) or failed (None)."""
        with self._lock:
            self._requests += 1
            self._latencies.append(latency_s)
            if confidences is None:
                self._errors += 1
            else:
                self._confidence_sum += float(np.sum(confidences))

    def record_inference(self, predictions: int, cpu_seconds: float) -> None:
        with self._lock:
            self._predictions += predictions
            self._cpu_seconds += cpu_seconds

    @property
    def requests(self) -> int:
        return self._requests

    def figures(self) -> Figures:
        with self._lock:
            latencies = np.fromiter(self._latencies, dtype=float) * 1000
            p50, p95 = (np.percentile(latencies, [50, 95]) if len(latencies) else (0.0, 0.0))
            answered = self._requests - self._errors
            per_1k = self._cpu_seconds / self._predictions * 1000 if self._predictions else 0.0
            mean_conf = self._confidence_sum / self._predictions if self._predictions and answered else 0.0
            return Figures(self._requests, self._errors, self._predictions, round(float(p50), 2),
                           round(float(p95), 2), round(mean_conf, 4), round(per_1k, 4),
                           round(per_1k * self._price, 8))


@dataclass(frozen=True)
class GuardVerdict(RuleVerdict):
    """The guards' decision on a new version against the old one: every guard (``checks``) and both sides' figures."""

    new: Figures
    old: Figures
    new_version: int
    old_version: int

    @property
    def checks(self) -> list[Rule]:
        """The guards, each a rule with its value, limit and result (``rules`` under the name the guards use)."""
        return self.rules

    @property
    def summary(self) -> str:
        if self.passed:
            return f"v{self.new_version} healthy: every guard passed against v{self.old_version}"
        return f"v{self.new_version} failed against v{self.old_version}: " + "; ".join(
            c.sentence for c in self.failed)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "summary": self.summary, "new_version": self.new_version,
                "old_version": self.old_version, "new": asdict(self.new), "old": asdict(self.old),
                "checks": self.rule_dicts()}

    def _figure_rows(self) -> list[tuple[str, float, float]]:
        return [(k, getattr(self.new, k), getattr(self.old, k)) for k in asdict(self.new)] + [
            ("error_rate", self.new.error_rate, self.old.error_rate)]

    def markdown(self) -> str:
        figures = "\n".join(f"| {k} | {n:g} | {o:g} |" for k, n, o in self._figure_rows())
        return (f"**Rollout guards: {self.summary}**\n\n{markdown_table(self.checks, 'guard')}\n"
                f"| figure | v{self.new_version} (new) | v{self.old_version} (old) |\n|---|---|---|\n{figures}\n")

    def html(self, title: str) -> str:
        figures = "".join(f"<tr><td>{k}</td><td>{n:g}</td><td>{o:g}</td></tr>" for k, n, o in self._figure_rows())
        return html_page(title, self.summary, html_table(self.checks, "guard")
                         + f"<table><tr><th>figure</th><th>v{self.new_version} (new)</th>"
                           f"<th>v{self.old_version} (old)</th></tr>{figures}</table>")


def judge(new: Figures, old: Figures, guards: Guards, new_version: int, old_version: int) -> GuardVerdict:
    """Every guard of the policy applied to the two models' figures over the same window."""
    checks = [
        at_most("error_rate_increase", new.error_rate - old.error_rate, guards.max_error_rate_increase),
        at_most("latency_p95_ratio", ratio(new.latency_p95_ms, old.latency_p95_ms), guards.max_latency_p95_ratio),
        at_least("confidence_ratio", ratio(new.mean_confidence, old.mean_confidence), guards.min_confidence_ratio),
        at_most("cost_per_1k_ratio", ratio(new.cpu_seconds_per_1k, old.cpu_seconds_per_1k),
                guards.max_cost_per_1k_ratio),
    ]
    return GuardVerdict(all(c.passed for c in checks), checks, new, old, new_version, old_version)
