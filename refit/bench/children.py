"""Child processes of the benchmarks: a free port for one, waiting until it listens or answers, stopping it.

``refit bench serve``, ``refit bench cascade``, ``refit bench feedback`` and
``refit bench faults`` start real servers and CLI processes; they find ports,
wait for readiness and stop their children through these, so a child is
stopped the same way everywhere: a signal, a wait, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from refit.errors import RefitError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until something accepts connections on ``port``: a helper process is up only once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the helper for port {port} exited {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until ``refit serve`` at ``url`` answers ``/readyz`` with 200; ``RefitError`` if it exits or times out first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RefitError(f"refit serve exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RefitError(f"refit serve at {url} was not ready within {timeout:.0f}s")


def _send(proc: subprocess.Popen, sig: int, group: bool) -> None:
    if not group:
        proc.send_signal(sig)
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop_child(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60, *,
               group: bool = False) -> int | None:
    """Send ``sig`` (SIGTERM: a server flushes its request log) and wait; SIGKILL if not exited within ``timeout``.

    ``group``: the child was started with ``start_new_session=True``, and the
    signal goes to its whole process group (what it started goes with it).
    A child that has already exited is left alone. Returns its exit code.
    """
    if proc.poll() is None:
        _send(proc, sig, group)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _send(proc, signal.SIGKILL, group)
            proc.wait(timeout=30)
    return proc.returncode
