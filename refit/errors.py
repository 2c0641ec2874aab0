"""Errors a user can act on. Everything else is a bug and keeps its traceback."""


class RefitError(Exception):
    """A problem with the user's input or setup, reported as one line.

    The CLI prints ``error: <message>`` and exits non-zero; flows end in a
    Failed state carrying the message instead of dying with a traceback.
    """
