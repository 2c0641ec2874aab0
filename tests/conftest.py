"""Shared fixtures: the real data, a real S3 endpoint (moto server), both stores, settings, Prefect.

Nothing here is mocked: the S3 endpoint is a moto server in a subprocess on
127.0.0.1, MLflow uses a SQLite store under ``tmp_path`` and Prefect a
temporary local API.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest

# No network beyond 127.0.0.1, no telemetry: set before anything heavy is imported.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


FUZZ_CASES = pytest.StashKey[Counter]()


@pytest.fixture(scope="session")
def fuzz_cases(request) -> Counter:
    """Cases run per input surface by the hypothesis tests (test_fuzz_*), printed at the end of the session."""
    return request.config.stash.setdefault(FUZZ_CASES, Counter())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for surface, n in sorted(config.stash.get(FUZZ_CASES, Counter()).items()):
        terminalreporter.write_line(f"fuzz cases: {surface}={n}")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``runs_last`` go after all others (they move what the shared stack's other tests read)."""
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The CLINC150 directory: REFIT_DATA_DIR, or ../shared/data/clinc150 beside the checkout."""
    configured = os.environ.get("REFIT_DATA_DIR")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared/data/clinc150"
    if not (path / "data_full.json").is_file():
        pytest.skip(f"CLINC150 data not found at {path} (set REFIT_DATA_DIR to a directory with data_full.json)")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_answers(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is up
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"moto server did not answer at {url} within {timeout:.0f}s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 API: ``python -m moto.server`` on a free 127.0.0.1 port, with fake credentials."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_AWS.items():
            mp.setenv(key, value)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path_factory.mktemp("moto") / "moto.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=fh, stderr=subprocess.STDOUT,
            )
        try:
            try:
                _wait_until_answers(url, proc)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; log:\n{log.read_text()[-2000:]}") from None
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(params=["local", "s3"], ids=["local", "s3"])
def store(request, tmp_path):
    """Each object store backend, empty: a local directory, or a fresh bucket on the moto endpoint."""
    from refit.store import LocalStore, S3Store

    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    s3 = S3Store(bucket=f"test-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint)
    s3.ensure_bucket()
    return s3


@pytest.fixture
def refit_env(tmp_path, monkeypatch, data_dir):
    """Settings from the environment, with REFIT_HOME in tmp_path and the real data."""
    from refit.settings import Settings

    monkeypatch.setenv("REFIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REFIT_DATA_DIR", str(data_dir))
    return Settings()


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API for the whole session (it takes ~15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="session")
def stack(tmp_path_factory, data_dir):
    """The session's local stack (`refit stack up`), shared by tests/server and tests/ui (server/stack_session.py)."""
    from server import stack_session

    home = tmp_path_factory.mktemp("stack-home")
    running = stack_session.start(home, data_dir)
    yield running
    if stack_session._stack is running:
        stack_session.stop(running.home, running.env)


@pytest.fixture(scope="session")
def deployed(stack):
    """Champion v1 on the tiny scenario and every deployment of prefect.yaml on the stack."""
    from server import stack_session

    return stack_session.deploy(stack)
