"""Errors a user can act on. Everything else is a bug and keeps its traceback."""


class RefitError(Exception):
    """A problem with the user's input or setup, reported as one line.

    The CLI prints ``error: <message>`` and exits non-zero; flows end in a
    Failed state carrying the message instead of dying with a traceback.
    """


class WindowTooSmall(RefitError):
    """Too little traffic to judge yet: nothing is wrong, the check waits for more.

    A scheduled monitor completes with action ``wait`` on it (a quiet hour is
    not a failure); the window is not recorded as checked, so the next check
    covers it together with the new traffic.
    """
