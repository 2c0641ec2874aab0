"""Stop the temporary Prefect API a `refit` command started if that command is killed.

Without ``PREFECT_API_URL``, Prefect starts its own API server as a child
process for the length of a flow run and stops it at exit. A command killed
with SIGKILL (or a timeout) never reaches its exit, and the server is left
running with nobody to stop it. ``watch()`` starts a small process that
notes the command's temporary API servers while the command lives, and
SIGTERMs them as soon as it is gone. Standard library only: it costs a few
MB and starts in a few milliseconds.

Run as ``python -m refit.orphans PID``; ``watch()`` does that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from refit import processes

MARKER = "prefect.server.api.server:create_app"  # the temporary API's command line


def guard(parent: int, every: float = 1.0, on_first_look=lambda: None) -> list[int]:
    """Until ``parent`` exits, note its temporary API servers; then stop those still running. Returns them."""
    servers: set[int] = set()
    looked = False
    while processes.alive(parent):
        servers |= {pid for pid in processes.descendants(parent) if MARKER in processes.cmdline(pid)}
        if not looked:
            looked = True
            on_first_look()
        time.sleep(every)
    stopped = []
    for pid in servers:
        if processes.alive(pid) and MARKER in processes.cmdline(pid):  # the same process, not a recycled pid
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
    return stopped


def watch() -> subprocess.Popen | None:
    """Guard this process's temporary Prefect API (Linux only; nothing to do with a Prefect server)."""
    if os.environ.get("PREFECT_API_URL") or not Path("/proc/self/stat").exists():
        return None
    return subprocess.Popen([sys.executable, "-m", "refit.orphans", str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


if __name__ == "__main__":
    guard(int(sys.argv[1]), on_first_look=lambda: print("watching", flush=True))
