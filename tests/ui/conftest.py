"""Fixtures over the session's local stack, shared with tests/server (see tests/server/stack_session.py)."""

from __future__ import annotations

import pytest

from server import stack_session


@pytest.fixture(scope="session")
def stack(tmp_path_factory, data_dir):
    home = tmp_path_factory.mktemp("stack-home")
    running = stack_session.start(home, data_dir)
    yield running
    if stack_session._stack is running:
        stack_session.stop(running.home, running.env)


@pytest.fixture(scope="session")
def deployed(stack):
    return stack_session.deploy(stack)
