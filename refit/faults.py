"""Named fault points, for fault-injection tests and ``refit bench faults``.

Like etcd's gofail or FreeBSD's fail points: the code marks a stage boundary
with ``faults.point("update.after_train")``, which does nothing unless the
environment variable ``REFIT_FAULTS`` names that point with an action::

    REFIT_FAULTS="update.after_train=kill"            # SIGKILL this process there
    REFIT_FAULTS="update.promote=term;lock.acquired=raise"

Actions:

- ``kill``: SIGKILL this process (a lost machine, an OOM kill).
- ``term``: send this process SIGTERM, then go on as the code would, so what
  is tested is the process's own SIGTERM handling (a pod being stopped).
- ``raise``: raise ``FaultInjected`` (a ``RuntimeError``), as an outage would.
- ``pause``: write ``<point>.paused`` in ``REFIT_FAULTS_DIR`` and wait until
  that file is deleted (up to ten minutes): a test breaks something meanwhile.

When ``REFIT_FAULTS_DIR`` is set, a point that acts first writes
``<point>.reached`` there, so a test knows the fault fired where it meant.
Standard library only; unset, a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

ENV = "REFIT_FAULTS"
DIR_ENV = "REFIT_FAULTS_DIR"
ACTIONS = ("kill", "term", "raise", "pause")
PAUSE_LIMIT_SECONDS = 600.0


class FaultInjected(RuntimeError):
    """Raised by a point whose action is ``raise``."""


def parse(spec: str) -> dict[str, str]:
    """``"a=kill;b=term"`` (``;`` or ``,`` between entries) as ``{"a": "kill", "b": "term"}``.

    Raises:
        ValueError: an entry without ``=`` or with an unknown action; a typo must not silently test nothing.
    """
    out: dict[str, str] = {}
    for entry in spec.replace(",", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, action = entry.partition("=")
        if not sep or action.strip() not in ACTIONS:
            raise ValueError(f"{ENV}: {entry!r} is not POINT=ACTION with ACTION one of {', '.join(ACTIONS)}")
        out[name.strip()] = action.strip()
    return out


def point(name: str) -> None:
    """A named place where a fault may be injected; a no-op unless ``REFIT_FAULTS`` names it."""
    value = os.environ.get(ENV)
    if not value:
        return
    action = parse(value).get(name)
    if action is None:
        return
    folder = os.environ.get(DIR_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.reached").write_text(f"{os.getpid()} {action}\n")
    print(f"refit fault point {name}: {action} (pid {os.getpid()})", file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # the signal is delivered before this returns; never go on past a kill
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "raise":
        raise FaultInjected(f"fault injected at {name}")
    elif action == "pause":
        if not folder:
            raise FaultInjected(f"fault point {name}: pause needs {DIR_ENV}")
        marker = Path(folder) / f"{name}.paused"
        marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + PAUSE_LIMIT_SECONDS
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
