"""A stop request that cannot be lost: SIGTERM noted by refit itself and checked between training steps.

Prefect turns SIGTERM into an exception raised wherever the main thread
happens to be. When that is inside a garbage-collector callback (SQLAlchemy
cleans up connections in weakref callbacks), Python prints the exception
and drops it, and the training would run on to the end. So training notes
the signal too, before handing it to whoever handled it before, and its
next step stops the run with ``SystemExit`` (exit status 143, as a process
killed by SIGTERM reports), which the flows close KILLED like Prefect's own.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()


def watch_sigterm() -> None:
    """Note SIGTERM in front of the handler in place now (Prefect's, inside a flow); the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "refit_watch", False):
        return

    def noted(signum, frame):
        _requested.set()
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            raise SystemExit(128 + signum)

    noted.refit_watch = True
    signal.signal(signal.SIGTERM, noted)


def stop_if_requested() -> None:
    """Raise ``SystemExit(143)`` once SIGTERM has arrived, however its own exception fared."""
    if _requested.is_set():
        raise SystemExit(128 + signal.SIGTERM)
