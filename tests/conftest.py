"""Tiers, the CI skip rule, and shared fixtures: the real data, a real S3 endpoint (moto server), both stores,
settings, Prefect.

Tiers: every test under tests/e2e, tests/server and tests/ui gets its folder's
marker unless its module names a tier itself (``faults``, or ``smoke`` for the
default tier's one end-to-end loop); ``e2e``, ``faults``, ``server`` and ``ui``
are also ``slow``, which the default selection (``addopts`` in pyproject.toml)
leaves out. Under ``CI=true`` a skip or xfail not listed in
tests/allowed_skips.py is a failure.

Nothing here is mocked: the S3 endpoint is a moto server in a subprocess on
127.0.0.1, MLflow uses a SQLite store under ``tmp_path`` and Prefect a
temporary local API.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest

from refit.bench.children import free_port

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


TESTS = Path(__file__).resolve().parent
SLOW_TIERS = ("e2e", "faults", "server", "ui")
FOLDER_TIERS = {"e2e": "e2e", "server": "server", "ui": "ui"}  # unit, integration, serving: the default tier
UNLISTED_SKIPS = pytest.StashKey[list]()
DESELECTED = pytest.StashKey[int]()


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(tryfirst=True)  # before the -m selection reads the markers
def pytest_collection_modifyitems(config, items):
    """Tier markers by folder (a module's own tier mark wins), ``slow`` on the slow tiers; ``runs_last`` last."""
    for item in items:
        tiers = [name for name in ("smoke", *SLOW_TIERS) if item.get_closest_marker(name)]
        if not tiers:
            folder = item.path.relative_to(TESTS).parts[0] if item.path.is_relative_to(TESTS) else ""
            if folder in FOLDER_TIERS:
                tiers = [FOLDER_TIERS[folder]]
                item.add_marker(tiers[0])
        if set(tiers) & set(SLOW_TIERS):
            item.add_marker("slow")
    # Tests marked ``runs_last`` go after all others (they move what the shared stack's other tests read).
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)


def pytest_deselected(items):
    if items:
        config = items[0].config
        config.stash[DESELECTED] = config.stash.get(DESELECTED, 0) + len(items)


def _unlisted(nodeid: str, report) -> str | None:
    """Why a skip or xfail of ``nodeid`` fails under CI; None when it is not one, or it is allowed."""
    from allowed_skips import allowed

    if not (ci() and report.skipped) or allowed(nodeid) is not None:
        return None
    if hasattr(report, "wasxfail"):
        why = f"xfailed ({report.wasxfail or 'no reason given'})"
    else:
        why = f"skipped ({report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr})"
    return f"{nodeid} {why} under CI=true; it is not listed in tests/allowed_skips.py"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a test's unlisted skip or xfail is reported as its failure."""
    report = yield
    why = _unlisted(report.nodeid, report)
    if why is not None:
        report.outcome, report.longrepr = "failed", why
        item.config.stash.setdefault(UNLISTED_SKIPS, []).append(why)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Under CI, a module that skips at import (``importorskip``, ``pytest.skip(allow_module_level=True)``) fails
    the session: its tests never ran."""
    report = yield
    why = _unlisted(report.nodeid, report)
    if why is not None:
        collector.config.stash.setdefault(UNLISTED_SKIPS, []).append(why)
    return report


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if session.config.stash.get(UNLISTED_SKIPS, []) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for surface, n in sorted(config.stash.get(FUZZ_CASES, Counter()).items()):
        terminalreporter.write_line(f"fuzz cases: {surface}={n}")
    unlisted = config.stash.get(UNLISTED_SKIPS, [])
    if unlisted:
        terminalreporter.section("skips that fail under CI", red=True)
        for why in unlisted:
            terminalreporter.write_line(why)
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and config.stash.get(DESELECTED, 0) \
            and config.option.markexpr == "not slow":
        terminalreporter.write_line('every test collected here is in a slow tier, which the default selection '
                                    '(-m "not slow") leaves out: add -m slow, -m e2e, -m faults, -m server, -m ui, '
                                    'or -m "" for everything')


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The CLINC150 directory: REFIT_DATA_DIR, or ../shared/data/clinc150 beside the checkout."""
    configured = os.environ.get("REFIT_DATA_DIR")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared/data/clinc150"
    if not (path / "data_full.json").is_file():
        pytest.skip(f"CLINC150 data not found at {path} (set REFIT_DATA_DIR to a directory with data_full.json)")
    return path


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
        port = free_port()
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
