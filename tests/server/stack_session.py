"""One local stack per test session, shared by ``tests/server`` and ``tests/ui``.

Real servers on free 127.0.0.1 ports, started through the CLI a user types
(`refit stack up`): a Prefect server with its scheduler and event triggers, a
process worker, an MLflow tracking server on SQLite. On it: champion v1 on the
tiny scenario, every deployment of ``prefect.yaml``, and (once, on demand) the
scheduled path: a drifted window whose labels come one window late, the monitor
schedule firing (a drift episode opens and waits for labels, then has enough),
the drift event starting the update deployment, the promotion.

Each step runs once per session and is cached here, so the UI test can reuse
what the server test built, or build it alone when run alone. The ``stack``
and ``deployed`` fixtures in ``tests/conftest.py`` wrap it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from refit import processes
from refit.bench.children import free_port

ROOT = Path(__file__).resolve().parents[2]
TINY = Path(__file__).with_name("clinc-shift-tiny.yaml")
REFIT = [sys.executable, "-m", "refit.cli"]
PREFECT = [sys.executable, "-m", "prefect", "--no-prompt"]
MODEL = "intent-classifier"
# Faster loops than production, so a schedule or a queued run shows up in seconds rather than a minute.
FAST = {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO"}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    status: dict
    up_seconds: float
    cache: dict = field(default_factory=dict)

    @property
    def api(self) -> str:
        return self.env["PREFECT_API_URL"]

    @property
    def mlflow_uri(self) -> str:
        return self.env["REFIT_MLFLOW_TRACKING_URI"]

    def run(self, args: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args[2:])} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def call(self, path: str, body: dict | None = None, method: str = "POST"):
        """One Prefect REST call (the same API the UI and the CLI use)."""
        request = urllib.request.Request(f"{self.api}{path}", method=method,
                                         data=json.dumps(body or {}).encode() if method != "GET" else None,
                                         headers={"Content-Type": "application/json"})
        for attempt in range(5):
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    text = response.read()
                return json.loads(text) if text else None
            except urllib.error.HTTPError as exc:  # SQLite busy on a loaded machine answers 503: try again
                if exc.code != 503 or attempt == 4:
                    raise
                time.sleep(1 + attempt)

    def deployment(self, name: str) -> dict:
        (found,) = [d for d in self.call("/deployments/filter") if d["name"] == name]
        return found

    def flow_runs(self, deployment: str) -> list[dict]:
        return self.call("/flow_runs/filter", {"deployments": {"id": {"any_": [self.deployment(deployment)["id"]]}},
                                               "sort": "EXPECTED_START_TIME_ASC"})

    def wait_for(self, what: str, predicate, timeout: float, every: float = 2.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate()
            if found:
                return found
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def wait_done(self, flow_run_id: str, timeout: float) -> dict:
        def done():
            run = self.call(f"/flow_runs/{flow_run_id}", method="GET")
            return run if run["state_type"] in TERMINAL else None

        return self.wait_for(f"flow run {flow_run_id} to finish", done, timeout)

    def run_logs(self, flow_run_id: str) -> str:
        entries = self.call("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                             "sort": "TIMESTAMP_ASC"})
        return "\n".join(e["message"] for e in entries)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.home / "stack").glob("*.log")))

    def mlflow(self):
        from mlflow import MlflowClient

        # The registry too: an earlier test in this process may have set a global registry URI.
        return MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)


_stack: Stack | None = None


def start(home: Path, data_dir: Path) -> Stack:
    """`refit stack up` on free ports (once per session)."""
    global _stack
    if _stack is not None:
        return _stack
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "REFIT_", "MLFLOW_"))}
    env |= FAST | {"REFIT_HOME": str(home), "REFIT_DATA_DIR": str(data_dir)}
    ports = [f"--prefect-port={free_port()}", f"--mlflow-port={free_port()}"]
    began = time.monotonic()
    proc = subprocess.run(REFIT + ["stack", "up", "--json", *ports], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    up_seconds = time.monotonic() - began
    if proc.returncode != 0:
        stop(home, env)
        raise AssertionError(f"refit stack up failed:\n{proc.stderr[-3000:]}")
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    _stack = Stack(home, env | status["env"], status, up_seconds)
    return _stack


def stop(home: Path, env: dict[str, str]) -> None:
    """`refit stack down`, then check that no process of the stack is left."""
    global _stack
    pids = [int(p.read_text()) for p in (home / "stack").glob("*.pid")]
    down = subprocess.run(REFIT + ["stack", "down"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    _stack = None
    assert down.returncode == 0, down.stderr
    left = [pid for pid in pids if processes.alive(pid)]
    assert not left, f"stack processes still alive after `refit stack down`: {left}"


def deploy(stack: Stack) -> dict:
    """Champion v1 on the tiny scenario (through the MLflow server), then `prefect deploy --all`."""
    if "champion" not in stack.cache:
        boot = stack.run(REFIT + ["bootstrap", "--scenario", str(TINY), "--json"], timeout=900)
        stack.cache["champion"] = json.loads(boot.stdout.strip().splitlines()[-1])
        began = time.monotonic()
        stack.run(PREFECT + ["deploy", "--all"], timeout=300)
        stack.cache["deploy_seconds"] = round(time.monotonic() - began, 1)
    return stack.cache["champion"]


def scenario_data(stack: Stack):
    from refit.scenario import build, load_scenario, load_source

    spec, _ = load_scenario(str(TINY))
    return spec, build(spec, load_source(spec.source, Path(stack.env["REFIT_DATA_DIR"])))


def _store(stack: Stack):
    import mlflow

    from refit.settings import Settings
    from refit.store import open_store

    mlflow.set_tracking_uri(stack.mlflow_uri)
    mlflow.set_registry_uri(stack.mlflow_uri)
    return open_store(Settings(home=stack.home, mlflow_tracking_uri=stack.mlflow_uri,
                               data_dir=Path(stack.env["REFIT_DATA_DIR"])))


def write_drifted_traffic(stack: Stack, version: int, start: datetime, end: datetime, seed_offset: int = 1):
    """The shifted traffic of the scenario, scored by ``version`` and logged as serving would, over ``[start, end)``.

    Returns the delayed labels of the scenario's labelled share of it (request_id, label, source), not yet
    delivered: ``deliver_labels`` files them, as a labelling job would, whenever the test says they arrive.
    """
    import numpy as np
    import pandas as pd

    from refit import modeling
    from registry import versions
    from tasks.ingest import replay_traffic

    store = _store(stack)
    spec, data = scenario_data(stack)
    model = modeling.load_model(versions.download_adapter(MODEL, version))
    served = replay_traffic.fn(store, MODEL, model, modeling.load_tokenizer(), version, data.shifted_window,
                               start, end, seed=spec.seed + seed_offset)
    picked = np.random.default_rng(spec.seed + seed_offset).random(len(served)) < spec.windows.labelled_share
    return pd.DataFrame({"request_id": served["request_id"][picked].to_numpy(),
                         "label": data.shifted_window["label"].to_numpy()[picked], "source": "delayed-feedback"})


def deliver_labels(stack: Stack, labels) -> None:
    """Delayed labels arrive now (filed under today's date, as they would be)."""
    from refit import requestlog

    requestlog.write_labels(_store(stack), MODEL, labels)


def write_drifted_window(stack: Stack, version: int, end: datetime | None = None,
                         seed_offset: int = 1) -> tuple[datetime, datetime]:
    """Ten minutes of shifted traffic ending at ``end`` (now by default; an earlier end gives a window of its
    own), with its delayed labels already arrived."""
    end = end or datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=5)
    start = end - timedelta(minutes=10)
    deliver_labels(stack, write_drifted_traffic(stack, version, start, end, seed_offset))
    return start, end


@contextmanager
def holding_slot(stack: Stack, name: str, seconds: int = 900):
    """Hold the Prefect global concurrency limit ``name`` (one slot) from the test, as a running flow would.

    A flow that takes the same slot (``flows.common.one_at_a_time``) starts and then waits for it, so
    the test can look at the world while that flow has started but done nothing yet.
    """
    try:
        stack.call(f"/v2/concurrency_limits/{name}", method="GET")
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
        stack.call("/v2/concurrency_limits/", {"name": name, "limit": 1})
    lease = stack.call("/v2/concurrency_limits/increment-with-lease",
                       {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": seconds})
    try:
        yield
    finally:
        stack.call("/v2/concurrency_limits/decrement-with-lease", {"lease_id": lease["lease_id"]})


def _set_schedule(stack: Stack, active: bool) -> None:
    """Resume or pause the monitor's schedule; pausing also drops the ticks already queued and waits for any
    tick already running, so nothing checks behind the test's back."""
    monitor_id = stack.deployment("monitor")["id"]
    stack.call(f"/deployments/{monitor_id}", {"paused": not active}, method="PATCH")
    if active:
        return
    for run in stack.flow_runs("monitor"):  # pausing removes most; a tick already queued goes here
        if run["state_type"] == "SCHEDULED":
            try:
                stack.call(f"/flow_runs/{run['id']}", method="DELETE")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:  # already gone
                    raise
    stack.wait_for("the monitor's running ticks to finish", lambda: all(
        r["state_type"] in TERMINAL | {"SCHEDULED"} for r in stack.flow_runs("monitor")), timeout=300)


def _drift_checks(stack: Stack, where: str = "") -> list:
    client = stack.mlflow()
    experiment = client.get_experiment_by_name("refit")
    return client.search_runs([experiment.experiment_id], f"tags.`refit.run_type` = 'drift-check'{where}",
                              order_by=["attributes.start_time DESC"])


def scheduled_update(stack: Stack, interval_s: int = 20) -> dict:
    """The scheduled path, once, with labels that arrive one window late.

    1. Drifted traffic (window A) whose labels have not arrived. The monitor's schedule fires: the check
       finds drift, opens the drift episode, counts no labels and waits (completed).
    2. A's labels arrive, then window B's traffic (its own labels never do). The next scheduled check joins
       the episode, counts A's labels over it, and its ``refit.drift.detected`` starts the update deployment.
    3. While that update has started but waits for the model's update slot (held here), a second check of
       the same traffic (by hand) must start nothing: the episode's update is under way.
    4. The slot is freed: the update learns from the episode's labels, promotes, and closes the episode.

    Returns the monitor runs, the MLflow drift checks (waiting, triggering, second), the episode, the late
    labels, the update run and every update flow run that existed once it finished.
    """
    if "scheduled" in stack.cache:
        return stack.cache["scheduled"]
    champion = deploy(stack)["version"]
    began = time.monotonic()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    late = write_drifted_traffic(stack, champion, now - timedelta(minutes=10, seconds=5), now - timedelta(seconds=5))
    # A short interval for the test; production keeps prefect.yaml's hourly cron.
    stack.run(PREFECT + ["deploy", "--name", "monitor", "--interval", str(interval_s)], timeout=300)

    def monitor_done():
        # A tick that finds the previous check still running waits for the model's slot: take one that ran.
        runs = [r for r in stack.flow_runs("monitor")
                if r["auto_scheduled"] and r["state_type"] in TERMINAL - {"CANCELLED"}]
        return runs[0] if runs else None

    first = stack.wait_for("a scheduled monitor run to finish", monitor_done, timeout=300)
    # One check at a time: pause the schedule so later ticks do not compete for the two cores.
    _set_schedule(stack, active=False)
    assert first["state_type"] == "COMPLETED", stack.run_logs(first["id"])
    waiting = _drift_checks(stack)[0]

    slot = f"refit-update-{MODEL}"
    with holding_slot(stack, slot):
        deliver_labels(stack, late)  # A's labels, one window late; before B, so any check that sees B sees them
        b_start = datetime.fromisoformat(waiting.data.tags["refit.window_end"]) + timedelta(seconds=1)
        write_drifted_traffic(stack, champion, b_start, datetime.now(timezone.utc) - timedelta(seconds=1),
                              seed_offset=2)
        _set_schedule(stack, active=True)
        (check,) = stack.wait_for("a scheduled check to start the update", lambda: _drift_checks(
            stack, " and tags.`refit.action` = 'update'"), timeout=300)
        _set_schedule(stack, active=False)
        update_run = stack.wait_for("the drift event to start the update deployment",
                                    lambda: (stack.flow_runs("update") or [None])[0], timeout=120)
        stack.wait_for("the update to start (it then waits for the model's update slot)", lambda: stack.call(
            f"/flow_runs/{update_run['id']}", method="GET")["state_type"] == "RUNNING", timeout=300)
        params = {"window_end": check.data.tags["refit.window_end"], "window_hours": 24}
        second = stack.wait_done(run_deployment(stack, "monitor/monitor", params)["id"], timeout=300)
        second_check = _drift_checks(stack)[0]
    update_run = stack.wait_done(update_run["id"], timeout=900)
    stack.cache["scheduled"] = {
        "monitor_runs": [r for r in stack.flow_runs("monitor") if r["state_type"] != "SCHEDULED"],
        "first_monitor_run": first, "second_monitor_run": second, "waiting_check": waiting, "drift_check": check,
        "second_check": second_check, "episode_id": check.data.tags.get("refit.episode_id"),
        "late_labels": late, "update_run": update_run, "update_runs": [r["id"] for r in stack.flow_runs("update")],
        "seconds": round(time.monotonic() - began, 1), "champion_before": champion}
    return stack.cache["scheduled"]


def champion(stack: Stack) -> int:
    return int(stack.mlflow().get_model_version_by_alias(MODEL, "champion").version)


def run_deployment(stack: Stack, deployment: str, params: dict) -> dict:
    """`prefect deployment run` with JSON parameters; returns the flow run it created."""
    proc = stack.run(PREFECT + ["deployment", "run", deployment, "--params", json.dumps(params)])
    run_id = next(line.split("UUID:")[1].strip() for line in proc.stdout.splitlines() if "UUID:" in line)
    return stack.call(f"/flow_runs/{run_id}", method="GET")


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process, its process group and every descendant, as a lost machine would stop them."""
    import signal

    pids = [pid, *processes.descendants(pid)]
    for p in pids:  # stop each first, so nothing forks while the rest are killed
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
