"""The only tests that may skip (or xfail) under CI=true, each with why.

Under ``CI=true`` (``.ci/run`` sets it) a skipped or xfailed test that is not
listed here fails the run (``tests/conftest.py``): a missing CLINC150
directory, a missing Chromium or a missing package must not pass CI quietly.
Keys are test ids as pytest prints them (``tests/dir/test_file.py::test_name``);
a key covers every parameter of its test, and a key ending in ``.py`` every
test of that module. Outside CI, skips behave as usual.
"""

from __future__ import annotations

ALLOWED: dict[str, str] = {}


def allowed(nodeid: str) -> str | None:
    """Why ``nodeid`` may skip under CI, or None when it may not."""
    test = nodeid.split("[", 1)[0]  # every parameter of a listed test
    for key, reason in ALLOWED.items():
        if test == key or (key.endswith(".py") and test.startswith(key + "::")):
            return reason
    return None
