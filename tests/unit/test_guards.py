"""Rollout guards on plain figures: ratios against a zero, and a canary whose old side got no traffic.

``Rollout`` never calls its models, so a stand-in with a version number is
enough here (the real models are in tests/serving). Its clock is a manual
one (``clock``): windows end when the test moves time on, never by a margin
of the real clock.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from serving.guards import Guards, LiveStats, RolloutPolicy, judge, ratio
from serving.rollout import Rollout

GUARDS = Guards(max_error_rate_increase=0.02, max_latency_p95_ratio=1.5, min_confidence_ratio=0.8,
                max_cost_per_1k_ratio=1.5)


def test_ratio_fails_safe_against_a_zero():
    assert ratio(2.0, 1.0) == 2.0
    assert ratio(0.0, 0.0) == 1.0  # nothing before, nothing now: no change
    assert math.isinf(ratio(0.5, 0.0))  # a rise from nothing: an at_most rule refuses it, an at_least one passes
    stats = LiveStats(0.048)
    for _ in range(10):
        stats.record_request(0.01, np.array([0.9]))
        stats.record_inference(1, 0.001)
    zero = LiveStats(0.048).figures()
    verdict = judge(stats.figures(), zero, GUARDS, 2, 1)
    assert not verdict.passed and {c.name for c in verdict.checks if not c.passed} == {"latency_p95_ratio",
                                                                                       "cost_per_1k_ratio"}


class ManualClock:
    """``serving.rollout``'s time: it moves only when the test says."""

    def __init__(self):
        self.now = 1_000_000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> ManualClock:
    import serving.rollout

    manual = ManualClock()
    monkeypatch.setattr(serving.rollout, "time", manual)
    return manual


def _model(version: int):
    return SimpleNamespace(version=version, runtime="torch")


def _traffic(stats: LiveStats, n: int, latency: float = 0.01, confidence: float = 0.9) -> None:
    for _ in range(n):
        stats.record_request(latency, np.array([confidence]))
        stats.record_inference(1, 0.001)


def test_a_canary_whose_old_version_got_no_traffic_is_not_rolled_back_for_it(clock):
    """canary_share 1: the old version answers nothing in the window. Its zero figures used to make every
    ratio infinite and roll back a healthy version; now the old version's figures from before the canary
    are the baseline, and with none at all nothing is judged."""
    policy = RolloutPolicy(mode="canary", canary_share=1.0, window_seconds=0.2, min_requests=5,
                           check_every_seconds=0.1, watch_seconds=0.0, guards=GUARDS)
    rolled_back = []
    rollout = Rollout(policy, lambda: LiveStats(0.048), lambda verdict, phase, restored: rolled_back.append(verdict))
    rollout.adopt(_model(1))
    _traffic(rollout.champion.stats, 20)  # v1 served before the canary
    rollout.adopt(_model(2))
    _traffic(rollout.candidate.stats, 20)  # every request goes to v2
    assert rollout.champion.stats.requests == 0
    verdict = rollout.check()
    assert rolled_back == [] and verdict is not None and verdict.passed
    assert rollout.status()["phase"] == "canary"  # judged, healthy, and the window is not over yet
    clock.advance(0.25)
    rollout.check()
    assert rollout.status()["phase"] == "watch" and rolled_back == []

    fresh = Rollout(policy, lambda: LiveStats(0.048), lambda verdict, phase, restored: rolled_back.append(verdict))
    fresh.adopt(_model(1))  # a restarted server: v1 has no figures at all
    fresh.adopt(_model(2))
    _traffic(fresh.candidate.stats, 20)
    assert fresh.check() is None and rolled_back == []  # no baseline: not judged


def test_a_settled_watch_is_reported_once(clock):
    policy = RolloutPolicy(mode="canary", canary_share=0.5, window_seconds=0.05, min_requests=1,
                           check_every_seconds=0.1, watch_seconds=0.05, guards=GUARDS)
    settled = []
    rollout = Rollout(policy, lambda: LiveStats(0.048), on_settle=lambda version, baseline: settled.append(
        (version, baseline)))
    rollout.adopt(_model(1))
    rollout.adopt(_model(2))
    _traffic(rollout.candidate.stats, 5)
    _traffic(rollout.champion.stats, 5)
    rollout.check()
    assert rollout.status()["phase"] == "canary" and settled == []
    clock.advance(0.06)
    rollout.check()  # canary over: watch
    assert rollout.status()["phase"] == "watch"
    _traffic(rollout.champion.stats, 5)
    rollout.check()
    assert rollout.status()["phase"] == "watch" and settled == []  # the watch is not over yet
    clock.advance(0.06)
    rollout.check()
    rollout.check()
    assert rollout.status()["phase"] == "stable" and settled == [(2, 1)]
