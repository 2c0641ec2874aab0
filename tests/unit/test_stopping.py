"""SIGTERM stops training even when the exception Prefect raises for it is lost on the way."""

from __future__ import annotations

import subprocess
import sys

LOST = """
import os, signal
from refit import stopping
signal.signal(signal.SIGTERM, lambda signum, frame: None)  # its exception lost, as in a garbage-collector callback
stopping.watch_sigterm()
os.kill(os.getpid(), signal.SIGTERM)
stopping.stop_if_requested()
print("trained on")
"""

DEFAULT = """
import os, signal, time
from refit import stopping
stopping.watch_sigterm()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("trained on")
"""


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_the_next_step_stops_with_status_143_when_the_signal_was_swallowed():
    done = _run(LOST)
    assert done.returncode == 143, done.stderr
    assert "trained on" not in done.stdout


def test_with_no_handler_before_it_the_signal_still_ends_the_process():
    done = _run(DEFAULT)
    assert done.returncode == 143, done.stderr
    assert "trained on" not in done.stdout


def test_nothing_stops_without_a_signal():
    done = _run("from refit import stopping\nstopping.watch_sigterm()\nstopping.stop_if_requested()\nprint('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
