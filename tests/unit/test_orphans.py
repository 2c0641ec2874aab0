"""A killed `refit` command does not leave its temporary Prefect API running (refit/orphans.py).

Real processes: a stand-in for the command that starts a child whose command
line is the temporary API's, the guard process ``refit.orphans`` watching it,
and SIGKILL. The child here sleeps instead of serving: starting a real
Prefect API takes 15 s, and the guard only looks at command lines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from refit.orphans import MARKER
from refit.processes import alive

COMMAND = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "{MARKER}"])
other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "not-a-server"])
print(child.pid, other.pid, flush=True)
time.sleep(120)
"""


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_the_temporary_api_of_a_killed_command_is_stopped_and_nothing_else():
    command = subprocess.Popen([sys.executable, "-c", COMMAND], stdout=subprocess.PIPE, text=True)
    server, other = (int(pid) for pid in command.stdout.readline().split())
    guard = subprocess.Popen([sys.executable, "-m", "refit.orphans", str(command.pid)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert guard.stdout.readline().strip() == "watching"  # it has seen the server
        assert alive(server) and alive(other)
        command.kill()
        command.wait()
        assert _wait_gone(server, 10), "the temporary API outlived its command"
        assert guard.wait(timeout=10) == 0
        assert alive(other)  # only the API is the guard's business
    finally:
        for pid in (server, other):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        guard.kill()


def test_no_guard_against_a_prefect_server(monkeypatch):
    from refit import orphans

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert orphans.watch() is None
