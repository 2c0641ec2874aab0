"""Which model answers each request, and how a new champion earns all the traffic.

States of one server:

- ``stable``: the champion answers everything.
- ``canary``: a new version answers ``canary_share`` of requests; the old one
  the rest.  ``shadow``: the old one answers everything and the new one
  scores a mirrored copy, unanswered.
- ``watch``: the canary passed, the new version answers everything, and its
  figures keep being compared with the old version's from the window.

A guard failing in ``canary``, ``shadow`` or ``watch`` puts the old version
back at once (in memory) and hands the bad version to ``on_rollback``, which
moves the aliases in MLflow; a watch that ends well calls ``on_settle``.
The guards judge only when both sides have ``min_requests`` in the window:
an old version that got no traffic (``canary_share: 1``) is compared through
its figures from just before the canary began, and with no baseline at all
nothing is judged, so a ratio never divides by an empty window. Every swap replaces a reference: a request holds
the model it was given until it is answered, so none is dropped.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.guards import Figures, GuardVerdict, LiveStats, RolloutPolicy, judge
from refit.runtime.served import ServedModel

log = logging.getLogger("refit.serving")


@dataclass
class Slot:
    """A loaded version and its live figures."""

    model: ServedModel
    stats: LiveStats

    @property
    def version(self) -> int:
        return self.model.version


@dataclass
class Rollout:
    """The server's routing state; every method is safe to call from any thread."""

    policy: RolloutPolicy
    make_stats: Callable[[], LiveStats]
    on_rollback: Callable[[GuardVerdict, str, int], None] = lambda verdict, phase, restored: None
    on_settle: Callable[[int, int], None] = lambda version, baseline: None
    champion: Slot | None = None
    candidate: Slot | None = None  # the new version during canary/shadow; the old one during watch
    phase: str = "stable"
    phase_started: float = 0.0
    frozen_old: Figures | None = None
    before: Figures | None = None  # the old version's figures from before the canary: the fallback baseline
    refused: set[int] = field(default_factory=set)
    last_verdict: GuardVerdict | None = None
    events: list[dict] = field(default_factory=list)
    _settled: tuple[int, int] | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    @property
    def serving_version(self) -> int | None:
        """The version the registry should name champion once this rollout settles."""
        with self._lock:
            if self.phase in ("canary", "shadow") and self.candidate is not None:
                return self.candidate.version
            return self.champion.version if self.champion else None

    def route(self) -> tuple[Slot | None, Slot | None]:
        """(slot that answers, slot that scores a mirrored copy or None) for one request."""
        with self._lock:
            if self.phase == "canary" and self._rng.random() < self.policy.canary_share:
                return self.candidate, None
            if self.phase == "shadow":
                return self.champion, self.candidate
            return self.champion, None

    def _event(self, what: str, **facts) -> None:
        self.events = (self.events + [{"at": time.time(), "event": what, **facts}])[-50:]
        log.info("rollout: %s %s", what, facts)

    def adopt(self, model: ServedModel) -> str:
        """Serve a newly loaded version: canary, shadow or direct, as the policy says.

        Returns how it was adopted. Direct when there is no champion yet, when
        the policy says so, or when the version is the one this rollout would go
        back to (a rollback decided elsewhere).
        """
        with self._lock:
            new, baseline = Slot(model, self.make_stats()), self.champion
            going_back = (self.phase in ("canary", "shadow") and baseline is not None
                          and baseline.version == model.version) or (
                self.phase == "watch" and self.candidate is not None and self.candidate.version == model.version)
            if baseline is None or self.policy.mode == "direct" or going_back:
                self.champion, self.candidate, self.phase, self.frozen_old = new, None, "stable", None
                self._event("swapped", version=model.version)
                return "direct"
            # Fresh figures for both, so the guards compare them over the same window.
            self.before = baseline.stats.figures()
            self.champion, self.candidate = Slot(baseline.model, self.make_stats()), new
            self.phase, self.phase_started, self.frozen_old = self.policy.mode, time.monotonic(), None
            self._event(f"{self.policy.mode} started", version=model.version, baseline=baseline.version)
            return self.policy.mode

    def check(self) -> GuardVerdict | None:
        """Evaluate the guards once; roll back, end the window or end the watch as they say."""
        with self._lock:
            verdict, failed_in = self._check()
            settled = self._settled
            self._settled = None
            restored = self.champion.version if self.champion else None
        if failed_in:
            self.on_rollback(verdict, failed_in, restored)  # outside the lock: it talks to MLflow
        if settled:
            self.on_settle(*settled)
        return verdict

    def _check(self) -> tuple[GuardVerdict | None, str | None]:
        if self.phase == "stable" or self.candidate is None or self.champion is None:
            return None, None
        elapsed = time.monotonic() - self.phase_started
        if self.phase == "watch":
            new, old, old_version = self.champion, self.frozen_old, self.candidate.version
            span = self.policy.watch_seconds
        else:
            new, old, old_version = self.candidate, self.champion.stats.figures(), self.champion.version
            span = self.policy.window_seconds
        if old is not None and old.requests < self.policy.min_requests:
            old = self.before if self.before is not None and self.before.requests >= self.policy.min_requests else None
        if new.stats.requests < self.policy.min_requests or old is None:
            if elapsed >= span and self.phase == "watch":
                self._settle()
            elif elapsed >= span and new.stats.requests >= self.policy.min_requests:
                self._event("not judged", version=new.version, reason="the old version had no traffic to compare")
                self._promote_candidate(None)
            return None, None
        verdict = judge(new.stats.figures(), old, self.policy.guards, new.version, old_version)
        self.last_verdict = verdict
        if not verdict.passed:
            phase = self.phase
            self._roll_back(verdict)
            return verdict, phase
        if elapsed >= span and self.phase == "watch":
            self._settle()
        elif elapsed >= span:
            self._promote_candidate(verdict)
        return verdict, None

    def _roll_back(self, verdict: GuardVerdict) -> None:
        bad = verdict.new_version
        if self.phase == "watch":
            self.champion = Slot(self.candidate.model, self.make_stats())
        self.refused.add(bad)
        self._event("rolled back", version=bad, to=self.champion.version, phase=self.phase, reason=verdict.summary)
        self.candidate, self.phase, self.frozen_old = None, "stable", None

    def _promote_candidate(self, verdict: GuardVerdict | None) -> None:
        old = self.champion
        self.frozen_old = old.stats.figures()
        if self.frozen_old.requests < self.policy.min_requests:
            self.frozen_old = self.before
        self.champion, self.candidate = Slot(self.candidate.model, self.make_stats()), old
        self.phase, self.phase_started = "watch", time.monotonic()
        self._event("canary passed", version=self.champion.version,
                    verdict=verdict.summary if verdict else "not judged: no baseline")

    def _settle(self) -> None:
        self._event("settled", version=self.champion.version)
        self._settled = (self.champion.version, self.candidate.version)
        self.candidate, self.phase, self.frozen_old, self.before = None, "stable", None, None

    def status(self) -> dict:
        with self._lock:
            left = None
            if self.phase in ("canary", "shadow", "watch"):
                span = self.policy.watch_seconds if self.phase == "watch" else self.policy.window_seconds
                left = round(max(0.0, span - (time.monotonic() - self.phase_started)), 1)
            return {
                "phase": self.phase,
                "champion": self.champion.version if self.champion else None,
                "candidate": self.candidate.version if self.candidate else None,
                "runtimes": {slot.version: slot.model.runtime for slot in (self.champion, self.candidate) if slot},
                "seconds_left": left,
                "refused": sorted(self.refused),
                "last_verdict": self.last_verdict.to_dict() if self.last_verdict else None,
                "events": self.events[-10:],
            }
