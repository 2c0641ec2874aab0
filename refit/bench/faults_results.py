"""What ``refit bench faults`` records: a finished child process, a fault whose checks wait, a fault's outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Fault:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


@dataclass
class Child:
    """A finished child process: exit code, seconds, its log, the JSON its last line printed (if any)."""

    rc: int
    seconds: float
    log: Path
    started_ms: int
    ended_ms: int
    result: dict | None = None

    def tail(self, lines: int = 3) -> str:
        text = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(line[-200:] for line in text[-lines:])


@dataclass
class Pending:
    """A fault whose checks wait for the recovery that follows it."""

    name: str
    child: Child
    problems: list[str]
    notes: list[str] = field(default_factory=list)
    registry_after_fault: list[str] | None = None  # None: every registry problem after recovery counts


def now_ms() -> int:
    """Wall-clock milliseconds: MLflow's run start times are compared with these."""
    return int(time.time() * 1000)
