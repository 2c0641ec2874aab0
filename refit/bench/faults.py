"""``refit bench faults``: the loop under injected faults, with real processes and real servers.

In a fresh ``REFIT_HOME`` (embedded defaults: a local store directory, SQLite
MLflow, Prefect's temporary API) it bootstraps the small ``clinc-faults``
scenario, then injects faults, each into a child process (``refit update``,
``refit rollback``, ``refit serve``, a lock holder), through the fault points
of ``refit.faults`` (``REFIT_FAULTS``) or by stopping a server:

- SIGKILL, and separately SIGTERM, at each stage boundary of an update;
- SIGKILL at each step of a hand-run rollback;
- an expired promotion lock (its holder paused) taken by two waiters at once;
- two updates of one model at once;
- the MLflow server stopped mid-update;
- the S3 endpoint stopped while ``refit serve`` is under load, then restarted.

After each fault it recovers as an operator would (the next update, the
rollback again, servers restarted) and checks the invariants: the champion is
always a version that passed its gate (or the bootstrap); the aliases point
at registered versions and agree with the ``refit.deployed`` tags; no MLflow
run is left RUNNING; the month's ledger (``month_spend``) equals what the
attempts metered, killed attempts charged; request-log rows equal the texts
answered. A fault passes only if every check does; the detail says which
failed and how.

Each update learns a labelled file of one CLINC150 domain the champion's
lineage has not learned yet (a rollback makes its domain new again), so each
one can pass its gate. Composition code: it starts CLI processes and reads
MLflow and the store; it imports no flow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from refit.bench import faults_safety as safety
from refit.bench.loadtest import _free_port
from refit.bench.faults_safety import SAFETY_FAULTS, golden_problems

GATED = {"passed", "bootstrap (no gate)"}
SCENARIO = "clinc-faults"
UPDATE_POINTS = ("after_train", "after_register", "reference_write", "before_promote", "promote", "after_promote")
PROMOTED_AT = {"promote", "after_promote"}  # a kill here comes after the alias moved
ROLLBACK_POINTS = ("locked", "champion_moved", "aliases_moved", "run_created")
FAULTS = (tuple(f"update.kill.{p}" for p in UPDATE_POINTS)
          + ("lock.expired_two_waiters",)
          + tuple(f"rollback.kill.{p}" for p in ROLLBACK_POINTS[:1])
          + ("update.two_at_once",)
          + tuple(f"rollback.kill.{p}" for p in ROLLBACK_POINTS[1:2])
          + ("mlflow.down_mid_update",)
          + tuple(f"rollback.kill.{p}" for p in ROLLBACK_POINTS[2:3])
          + ("s3.down_under_load",)
          + tuple(f"update.term.{p}" for p in UPDATE_POINTS)
          + tuple(f"rollback.kill.{p}" for p in ROLLBACK_POINTS[3:])
          + SAFETY_FAULTS)
LOCK_TTL = 3.0


@dataclass
class Fault:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


@dataclass
class Child:
    """A finished child process: exit code, seconds, its log, the JSON its last line printed (if any)."""

    rc: int
    seconds: float
    log: Path
    started_ms: int
    ended_ms: int
    result: dict | None = None

    def tail(self, lines: int = 3) -> str:
        text = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(line[-200:] for line in text[-lines:])


@dataclass
class Pending:
    """A fault whose checks wait for the recovery that follows it."""

    name: str
    child: Child
    problems: list[str]
    notes: list[str] = field(default_factory=list)
    registry_after_fault: list[str] | None = None  # None: every registry problem after recovery counts


def _version_of(problem: str) -> str:
    """``"previous v5 is tagged ..."`` -> ``"v5 is tagged ..."``: one version's problem, whichever alias it holds now."""
    return problem.split(" ", 1)[1] if problem.startswith(("champion v", "previous v")) else problem


def _now_ms() -> int:
    return int(time.time() * 1000)


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
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


def _logged_rows(store, prefix: str, attempts: int = 10) -> int:
    """Request-log rows under ``prefix``, asked again while the endpoint that just came back settles."""
    for attempt in range(attempts):
        try:
            return len(store.read_parquet_prefix(prefix))
        except Exception:  # noqa: BLE001 - botocore's connection errors: the endpoint is restarting
            if attempt == attempts - 1:
                raise
            time.sleep(1)
    return 0


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode


class Bench:
    """One run of the benchmark in its own home; ``run`` returns the summary ``refit bench faults`` prints."""

    def __init__(self, home: Path, progress: Callable[[str], None], model_name: str = "intent-classifier"):
        from refit.settings import Settings

        self.home = home.resolve()
        self.logs = self.home / "bench-logs" / model_name
        self.logs.mkdir(parents=True, exist_ok=True)
        self.points_dir = self.home / "fault-points"
        self.progress = progress
        self.name = self.base_name = model_name
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("REFIT_", "PREFECT_", "MLFLOW_")) or k in ("REFIT_DATA_DIR", "REFIT_BASE_MODEL")}
        env |= {"REFIT_HOME": str(self.home), "REFIT_MODEL_NAME": model_name, "PYTHONUNBUFFERED": "1",
                "PREFECT_HOME": str(self.home / "prefect"), "REFIT_FAULTS_DIR": str(self.points_dir),
                "REFIT_TORCH_THREADS": os.environ.get("REFIT_TORCH_THREADS", "1"),
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
        self.env = env
        self.settings = Settings(home=self.home, model_name=model_name)
        self.results: list[Fault] = []
        self.champion_always_gated = True
        self.rows_lost = 0
        self.labels_lost = 0
        self.models: list[str] = []  # every story's model, for the checks at the end
        self.steps = 0
        self.files: dict[str, Path] = {}
        self.refused: set[tuple[int | None, str]] = set()  # (champion, file) pairs the gate refused
        self._experiment_id: str | None = None

    def new_story(self, suffix: str) -> None:
        """Go on with a model of its own, bootstrapped anew: every domain is new to it, so its updates can pass.

        A long series of updates teaches the champion's lineage one domain after
        another, and the golden suite grows with each; later updates then meet a
        gate they cannot pass and never reach the fault points past the gate.
        A fault that needs a promotion runs on a story where one can happen.
        """
        from refit.settings import Settings

        self.name = f"{self.base_name}-{suffix}"
        self.env["REFIT_MODEL_NAME"] = self.name
        self.settings = Settings(home=self.home, model_name=self.name)
        self.logs = self.home / "bench-logs" / self.name
        self.logs.mkdir(parents=True, exist_ok=True)
        self.refused = set()
        self.prepare()
        self.champion_gated()

    # -- processes -------------------------------------------------------------------------------------------

    def cli(self, label: str, *args: str, faults: str | None = None, env: dict | None = None,
            timeout: float = 1200) -> Child:
        """Run ``refit ARGS`` as a child process to the end; its output goes to a log file of its own."""
        proc, log, started = self.start(label, *args, faults=faults, env=env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = _stop(proc, signal.SIGKILL)
        return self.finish(proc, log, started, rc)

    def start(self, label: str, *args: str, faults: str | None = None, env: dict | None = None):
        self.steps += 1
        log = self.logs / f"{self.steps:02d}-{label}.log"
        child_env = self.env | (env or {}) | ({"REFIT_FAULTS": faults} if faults else {})
        started = _now_ms()
        handle = open(log, "w")
        handle.write(f"$ REFIT_FAULTS={faults or ''} refit {' '.join(args)}\n")
        handle.flush()
        proc = subprocess.Popen([sys.executable, "-m", "refit.cli", *args], env=child_env, stdout=handle,
                                stderr=subprocess.STDOUT, cwd=self.home, start_new_session=True)
        handle.close()
        return proc, log, started

    @staticmethod
    def finish(proc: subprocess.Popen, log: Path, started: int, rc: int | None = None) -> Child:
        rc = proc.wait() if rc is None else rc
        result = None
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("{")]
        if lines:
            try:
                result = json.loads(lines[-1])
            except ValueError:
                result = None
        return Child(rc, (_now_ms() - started) / 1000, log, started, _now_ms(), result)

    def helper(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        """``python -m refit.bench.faults ARGS``: a lock holder or waiter, or the S3 endpoint's proxy."""
        self.steps += 1
        log = open(self.logs / f"{self.steps:02d}-{args[0]}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "refit.bench.faults", *args], env=self.env | (env or {}),
                                stdout=log, stderr=subprocess.STDOUT, cwd=self.home, start_new_session=True)
        log.close()
        return proc

    # -- MLflow and the registry, read as an operator would ----------------------------------------------------

    def configure(self, tracking_uri: str | None = None) -> str:
        import mlflow

        from registry.tracking import configure

        if self._experiment_id is None:
            self._experiment_id = configure(self.settings)
        mlflow.set_tracking_uri(tracking_uri or self.settings.tracking_uri)
        mlflow.set_registry_uri(tracking_uri or self.settings.tracking_uri)
        return self._experiment_id

    def client(self):
        from mlflow import MlflowClient

        self.configure()
        return MlflowClient()

    def alias(self, alias: str) -> int | None:
        from registry import versions

        self.configure()
        return versions.alias_version(self.name, alias)

    def tags(self, version: int) -> dict[str, str]:
        return dict(self.client().get_model_version(self.name, str(version)).tags)

    def all_versions(self) -> dict[int, dict[str, str]]:
        return {int(v.version): dict(v.tags) for v in self.client().search_model_versions(f"name='{self.name}'")}

    def registry_problems(self) -> list[str]:
        """The champion passed its gate; champion and previous are registered, deployable and tagged as deployed."""
        problems = []
        every = self.all_versions()
        champion, previous = self.alias("champion"), self.alias("previous")
        if champion is None:
            return ["no champion"]
        for role, version in (("champion", champion), ("previous", previous)):
            if version is None:
                continue
            tags = every.get(version)
            if tags is None:
                problems.append(f"{role} points at v{version}, which is not registered")
                continue
            if tags.get("refit.gate_verdict") not in GATED:
                problems.append(f"{role} v{version} did not pass its gate ({tags.get('refit.gate_verdict')!r})")
                if role == "champion":
                    self.champion_always_gated = False
            deployed = tags.get("refit.deployed", "")
            if deployed != "champion":
                problems.append(f"{role} v{version} is tagged refit.deployed={deployed or 'nothing'!r}, not "
                                "'champion'")
        return problems

    def champion_gated(self) -> list[str]:
        champion = self.alias("champion")
        verdict = self.tags(champion).get("refit.gate_verdict") if champion is not None else None
        if verdict in GATED:
            return []
        self.champion_always_gated = False
        return [f"champion v{champion} did not pass its gate ({verdict!r})"]

    def running_runs(self, since_ms: int = 0, until_ms: int | None = None) -> list[str]:
        runs = self.client().search_runs([self.configure()], "attributes.status = 'RUNNING'", max_results=1000)
        return [f"{r.data.tags.get('refit.run_type', '?')} run {r.info.run_id[:8]}" for r in runs
                if r.info.start_time >= since_ms and (until_ms is None or r.info.start_time <= until_ms)]

    def ledger_problems(self, since_ms: int = 0, until_ms: int | None = None) -> tuple[list[str], float, float]:
        """The month's ledger against what the attempts metered; a killed attempt is charged its estimate.

        Returns the problems for update runs started in the window, the ledger and the expected spend.
        """
        from tasks.budget import month_spend

        client, experiment_id = self.client(), self.configure()
        now = datetime.now(timezone.utc)
        month_ms = int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)
        ledger = month_spend(experiment_id, self.name, month_ms)
        updates = client.search_runs([experiment_id], f"tags.`refit.run_type` = 'update' and tags.`refit.model` = "
                                                      f"'{self.name}' and attributes.start_time >= {month_ms}",
                                     max_results=5000)
        expected, problems = 0.0, []
        for run in updates:
            attempts = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' "
                                                           "and tags.`refit.run_type` = 'update-attempt'")
            metered = sum(a.data.metrics.get("update_cost_usd", 0.0) for a in attempts)
            unmetered = [a for a in attempts if "update_cost_usd" not in a.data.metrics]
            owed = metered + sum(a.data.metrics.get("estimate_cost_usd", run.data.metrics.get("estimate_cost_usd", 0.0))
                                 for a in unmetered)
            charged = run.data.metrics.get("update_cost_usd")
            reserved = run.data.metrics.get("reserved_usd", 0.0)
            if charged is not None and "update_cpu_seconds" in run.data.metrics and charged + 1e-9 >= metered:
                owed = charged  # finished: charged the whole update (every stage), at least its attempts' training
            elif charged is not None and owed - 1e-9 <= charged <= max(owed, reserved) + 1e-9:
                owed = charged  # killed: charged up to its reservation, which covers the whole update's estimate
            expected += owed
            in_window = run.info.start_time >= since_ms and (until_ms is None or run.info.start_time <= until_ms)
            if in_window and (charged is None or abs(charged - owed) > 1e-9 + 1e-6 * owed):
                what = "nothing" if charged is None else f"${charged:.6f}"
                problems.append(f"update run {run.info.run_id[:8]} charged {what} to the ledger, its attempts "
                                f"cost ${owed:.6f} ({len(unmetered)} killed before metering, charged their estimate)")
        return problems, ledger, expected

    def after_recovery(self, pending: Pending) -> Fault:
        """The checks that follow the recovery: registry, runs left RUNNING, the ledger, for this fault's window."""
        problems = list(pending.problems)
        after = self.registry_problems()
        if pending.registry_after_fault is not None:  # a series: only what this fault (or one before it) left
            left = {_version_of(p) for p in pending.registry_after_fault}
            after = [p for p in after if _version_of(p) in left]
        problems += after
        running = self.running_runs(pending.child.started_ms, pending.child.ended_ms)
        if running:
            problems.append(f"left RUNNING after recovery: {', '.join(running)}")
        ledger, _, _ = self.ledger_problems(pending.child.started_ms, pending.child.ended_ms)
        problems += ledger
        problems += [p for p in golden_problems(self) if p not in problems]
        return self.record(pending.name, problems, pending.notes)

    def record(self, name: str, problems: list[str], notes: list[str]) -> Fault:
        fault = Fault(name, not problems, "; ".join(problems + notes)[:2000] or "ok")
        self.results.append(fault)
        self.progress(f"{'PASS' if fault.passed else 'FAIL'} {name}: {fault.detail[:300]}")
        return fault

    # -- data ------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Bootstrap the scenario and write one labelled file per domain of its shifts."""
        from refit.scenario import build, load_scenario, load_source

        if self.name not in self.models:
            self.models.append(self.name)
        spec, _ = load_scenario(SCENARIO)
        data = build(spec, load_source(spec.source, self.settings.data_dir))
        inbox = self.home / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        for shift in data.shifts:
            window = shift.window[shift.window["group"].isin(shift.groups)]
            path = inbox / f"{shift.name}.csv"
            window[["text", "label"]].to_csv(path, index=False)
            self.files[shift.name] = path
        self.texts = data.no_drift_window["text"].tolist() + data.shifts[0].window["text"].tolist()
        if self.alias("champion") is None:
            self.progress(f"bootstrap of {SCENARIO} in {self.home}")
            boot = self.cli("bootstrap", "bootstrap", "--scenario", SCENARIO, "--json")
            if boot.rc != 0:
                raise RuntimeError(f"bootstrap failed (exit {boot.rc}): {boot.tail()}")

    def learned(self, version: int | None) -> set[str]:
        """The labelled files the version's lineage learned (its parents' data sources, to the bootstrap)."""
        out, seen = set(), set()
        every = self.all_versions()
        while version is not None and version not in seen:
            seen.add(version)
            tags = every.get(version, {})
            out.add(Path(tags.get("refit.data_source", "")).stem)
            parent = tags.get("refit.parent_version", "none")
            version = int(parent) if parent.isdigit() else None
        return out

    def fresh_file(self, skip: tuple[str, ...] = ()) -> Path:
        """A domain file the champion has not learned: an update on it can pass its gate."""
        champion = self.alias("champion")
        learned = self.learned(champion)
        for name, path in self.files.items():
            if name not in learned and name not in skip and (champion, name) not in self.refused:
                return path
        raise RuntimeError(f"no domain left that champion v{champion} has not learned ({sorted(learned - {''})}) "
                           f"or its gate has not refused")

    def update(self, label: str, faults: str | None = None, env: dict | None = None, path: Path | None = None) -> Child:
        path = path or self.fresh_file()
        champion = self.alias("champion")
        child = self.cli(label, "update", "--labels", str(path), "--force", "--reason", f"bench faults: {label}",
                         "--json", faults=faults, env=env)
        if child.result is not None and child.result.get("promoted") is False:
            self.refused.add((champion, path.stem))  # this domain does not pass against this champion
        return child

    def back_to_less_learned(self, why: str) -> int | None:
        """Roll the champion back to its previous version, if it has one: a lineage that learned fewer domains.

        Each promoted domain joins the golden suite, so a champion that learned
        several meets a gate a new domain's update may not pass (forgetting
        shows on the earlier domains). A fault that needs a promotion steps
        back instead of running out of domains. Returns the champion after.
        """
        champion, previous = self.alias("champion"), self.alias("previous")
        if previous is not None and previous != champion:
            self.progress(f"the gate refused against v{champion}: rolling back to v{previous} for {why}")
            self.cli(f"{why.replace('.', '-')}-step-back", "rollback", "--reason", f"bench faults: setting up {why}",
                     "--json")
        return self.alias("champion")

    def ensure_previous(self) -> None:
        """A champion with a previous version to roll back to (an update, when there is none)."""
        champion, previous = self.alias("champion"), self.alias("previous")
        if previous is None or previous == champion:
            for _ in range(3):  # a domain the gate refuses is skipped for the next
                self.progress("an update, so that there is a previous champion to roll back to")
                done = self.update("setup-update")
                if (done.result or {}).get("promoted"):
                    return
            raise RuntimeError(f"the setup update did not promote (exit {done.rc}): {done.tail()}")

    # -- faults ----------------------------------------------------------------------------------------------

    def update_series(self, how: str, points: list[str]) -> None:
        """Kill (or SIGTERM) an update at each stage boundary, one child each; then the next update recovers."""
        pending: list[Pending] = []
        for point in points:
            name = f"update.{how}.{point}"
            self.progress(f"fault {name}: refit update, {'SIGKILL' if how == 'kill' else 'SIGTERM'} at "
                          f"update.{point}")
            champion = self.alias("champion")
            reached = self.points_dir / f"update.{point}.reached"
            reached.unlink(missing_ok=True)
            try:
                for _ in range(3):  # an update the gate refuses never reaches the later points: the next domain
                    child = self.update(name.replace(".", "-"), faults=f"update.{point}={how}")
                    if reached.exists() or child.rc != 0 or (child.result or {}).get("promoted") is not False:
                        break
                    champion = self.back_to_less_learned(name) if point in PROMOTED_AT else champion
            except RuntimeError as exc:  # no domain left that this champion's gate can pass
                self.record(name, [f"could not run: {exc}"], [])
                continue
            problems, notes = [], [f"exit {child.rc} after {child.seconds:.0f} s"]
            if not reached.exists():
                problems.append(f"the fault point update.{point} was never reached ({child.tail()})")
            if how == "kill" and child.rc != -signal.SIGKILL:
                problems.append(f"expected death by SIGKILL, got exit {child.rc}")
            if how == "term" and child.rc == 0:
                problems.append("the update exited 0 after SIGTERM: a stopped update must say it did not finish")
            problems += self.champion_gated()
            now = self.alias("champion")
            if point in PROMOTED_AT and reached.exists():
                notes.append(f"champion v{champion} -> v{now} (the alias moved before the signal)")
                if now == champion:
                    problems.append("the promotion did not happen before the signal")
            elif now != champion:
                problems.append(f"champion moved v{champion} -> v{now} although the update stopped before "
                                "promoting")
            pending.append(Pending(name, child, problems, notes, self.registry_problems()))
        self.progress(f"recovery: the next update, after {len(points)} stopped update(s)")
        try:
            recovery = self.update(f"recovery-after-{how}")
        except RuntimeError as exc:  # every domain refused: the recovery is the same file again, refused or not
            recovery = self.update(f"recovery-after-{how}", path=next(iter(self.files.values())))
            self.progress(f"recovery on {next(iter(self.files))} again ({exc})")
        recovered = f"recovered by the next update (exit {recovery.rc}, promoted " \
                    f"{(recovery.result or {}).get('promoted')})"
        for item in pending:
            if recovery.rc != 0:
                item.problems.append(f"the recovery update failed: {recovery.tail()}")
            item.notes.append(recovered)
            self.after_recovery(item)

    def rollback_fault(self, point: str) -> None:
        name = f"rollback.kill.{point}"
        self.ensure_previous()
        champion, previous = self.alias("champion"), self.alias("previous")
        self.progress(f"fault {name}: refit rollback, SIGKILL at rollback.{point} (champion v{champion}, "
                      f"previous v{previous})")
        reached = self.points_dir / f"rollback.{point}.reached"
        reached.unlink(missing_ok=True)
        child = self.cli(name.replace(".", "-"), "rollback", "--reason", f"bench faults: {name}", "--json",
                         faults=f"rollback.{point}=kill")
        problems, notes = [], [f"exit {child.rc}"]
        if not reached.exists():
            problems.append(f"the fault point rollback.{point} was never reached ({child.tail()})")
        if child.rc != -signal.SIGKILL:
            problems.append(f"expected death by SIGKILL, got exit {child.rc}")
        problems += self.champion_gated()
        now = self.alias("champion")
        if now not in (champion, previous):
            problems.append(f"champion is v{now}, neither v{champion} nor v{previous}")
        notes.append(f"after the kill: champion v{now}, previous v{self.alias('previous')}")
        self.progress("recovery: refit rollback again")
        again = self.cli(f"recovery-{point}", "rollback", "--reason", f"bench faults: again after {name}", "--json")
        final, bad_tags = self.alias("champion"), self.tags(champion)
        if now == champion:  # nothing moved: the rollback run again must do it all
            if again.rc != 0 or final != previous:
                problems.append(f"the rollback run again did not finish it (exit {again.rc}, champion v{final}): "
                                f"{again.tail()}")
            notes.append(f"rollback again: exit {again.rc}, champion v{final}")
        else:  # the aliases moved: the rollback run again finishes the record the killed one never wrote
            if again.rc != 0 or final != previous:
                problems.append(f"the rollback run again after the aliases moved did not finish its record "
                                f"(exit {again.rc}, champion v{final}): {again.tail()}")
            notes.append(f"rollback again finished the record (exit {again.rc}), champion v{final}")
        if bad_tags.get("refit.deployed") != "rolled back" or not bad_tags.get("refit.rollback_run_id"):
            problems.append(f"v{champion} (demoted) carries refit.deployed={bad_tags.get('refit.deployed')!r}, "
                            f"rollback run {bad_tags.get('refit.rollback_run_id')!r}: the rollback's record is "
                            "incomplete")
        self.after_recovery(Pending(name, child, problems, notes))

    def lock_fault(self) -> None:
        """A holder paused past its lease; two waiters break the expired lock at once; the holder wakes and must
        write nothing."""
        name = "lock.expired_two_waiters"
        self.progress(f"fault {name}: lock holder SIGSTOPped past its {LOCK_TTL:.0f} s lease, two waiters")
        out = self.home / "lock-fault"
        out.mkdir(exist_ok=True)
        for stale in out.iterdir():
            stale.unlink()
        started = _now_ms()
        holder = self.helper("lock-holder", str(out))
        deadline = time.monotonic() + 180
        while not (out / "holder.json").exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        problems, notes = [], []
        if not (out / "holder.json").exists():
            _stop(holder, signal.SIGKILL)
            return self.record(name, [f"the holder never took the lock (exit {holder.poll()})"], [])
        os.killpg(holder.pid, signal.SIGSTOP)
        waiters = [self.helper("lock-waiter", str(out), str(i)) for i in (1, 2)]
        codes = [w.wait(timeout=300) for w in waiters]
        os.killpg(holder.pid, signal.SIGCONT)
        (out / "go").write_text("go")
        holder_rc = holder.wait(timeout=120)
        held = json.loads((out / "holder.json").read_text())
        got = [json.loads(p.read_text()) for p in sorted(out.glob("waiter-*.json"))]
        if codes != [0, 0] or len(got) != 2:
            problems.append(f"waiters exited {codes}, {len(got)} of 2 held the lock")
        else:
            a, b = sorted(got, key=lambda w: w["acquired"])
            if a["released"] > b["acquired"]:
                problems.append(f"both waiters held the lock at once ({a['released'] - b['acquired']:.2f} s overlap)")
            if not (held["number"] < a["number"] < b["number"]):
                problems.append(f"fencing numbers not increasing: holder {held['number']}, waiters "
                                f"{a['number']}, {b['number']}")
            if not (a.get("fenced") and b.get("fenced")):
                problems.append("a waiter holding the lock was refused at the fence")
            notes.append(f"waiters held it {a['acquired'] - held['acquired']:.1f} s and "
                         f"{b['acquired'] - held['acquired']:.1f} s after the holder took it, fences "
                         f"{a['number']}, {b['number']}")
        final = json.loads((out / "holder-final.json").read_text()) if (out / "holder-final.json").exists() else {}
        if holder_rc != 0 or not str(final.get("fence", "")).startswith("refused"):
            problems.append(f"the woken holder was not refused at the fence (exit {holder_rc}, {final})")
        else:
            notes.append(f"woken holder: {final['fence'][:120]}")
        from refit.store import open_store
        from registry import versions

        if versions.lock_key(self.name) in open_store(self.settings).list("locks/"):
            problems.append("the lock object was left behind")
        problems += self.champion_gated()
        running = self.running_runs(started)
        if running:
            problems.append(f"left RUNNING: {', '.join(running)}")
        self.record(name, problems, notes)

    def two_at_once(self) -> None:
        name = "update.two_at_once"
        path = self.fresh_file()
        champion = self.alias("champion")
        self.progress(f"fault {name}: two refit update processes of {path.name} at once (champion v{champion})")
        before = set(self.all_versions())
        runs = [self.start(f"two-at-once-{i}", "update", "--labels", str(path), "--force", "--reason",
                           f"bench faults: {name} {i}", "--json") for i in (1, 2)]
        children = [self.finish(proc, log, started) for proc, log, started in runs]
        problems, notes = [], [f"exits {[c.rc for c in children]}"]
        problems += self.champion_gated()
        new = {v: t for v, t in self.all_versions().items() if v not in before}
        promoted = [v for v, t in new.items() if t.get("refit.deployed") == "champion"]
        now = self.alias("champion")
        if len(promoted) > 1:
            problems.append(f"both promoted: {promoted}")
        if now != champion and now not in new:
            problems.append(f"champion v{now} is neither the old one nor a new one")
        notes.append(f"new versions {sorted(new)}: " + ", ".join(
            f"v{v} {t.get('refit.gate_verdict')}/{t.get('refit.deployed', 'not deployed')}" for v, t in sorted(new.items())))
        loser = [c for c in children if c.rc != 0]
        if loser:
            notes.append(f"the other: {loser[0].tail(1)[-200:]}")
        window = Child(0, 0, children[0].log, min(c.started_ms for c in children), max(c.ended_ms for c in children))
        self.after_recovery(Pending(name, window, problems, notes))

    def mlflow_down(self) -> None:
        """An update against an ``mlflow server``, which is stopped while the update trains, then restarted."""
        name = "mlflow.down_mid_update"
        port = _free_port()
        uri = f"http://127.0.0.1:{port}"
        champion = self.alias("champion")
        self.progress(f"fault {name}: mlflow server on {uri}, stopped while refit update trains")
        server = self.mlflow_server(port)
        env = {"REFIT_MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        paused = self.points_dir / "update.after_train.paused"
        paused.unlink(missing_ok=True)
        proc, log, started = self.start("mlflow-down-update", "update", "--labels", str(self.fresh_file()),
                                        "--force", "--json", faults="update.after_train=pause", env=env)
        deadline = time.monotonic() + 600
        while not paused.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        problems, notes = [], []
        if not paused.exists():
            problems.append("the update never reached training")
        server_rc = _stop(server)
        notes.append(f"mlflow server stopped (exit {server_rc}) after training")
        paused.unlink(missing_ok=True)
        child = self.finish(proc, log, started, proc.wait(timeout=900))
        notes.append(f"update exit {child.rc} after {child.seconds:.0f} s: {child.tail(1)[-200:]}")
        if child.rc == 0:
            problems.append("the update exited 0 with MLflow down")
        problems += self.champion_gated()
        if self.alias("champion") != champion:
            problems.append(f"champion moved to v{self.alias('champion')} with MLflow down")
        self.progress("recovery: mlflow server restarted, the next update through it")
        server = self.mlflow_server(port)
        try:
            recovery = self.update("recovery-mlflow", env={"REFIT_MLFLOW_TRACKING_URI": uri})
        finally:
            _stop(server)
        notes.append(f"recovered by the next update through the restarted server (exit {recovery.rc}, promoted "
                     f"{(recovery.result or {}).get('promoted')})")
        if recovery.rc != 0:
            problems.append(f"the recovery update failed: {recovery.tail()}")
        self.after_recovery(Pending(name, child, problems, notes))

    def mlflow_server(self, port: int) -> subprocess.Popen:
        import httpx

        self.steps += 1
        log = open(self.logs / f"{self.steps:02d}-mlflow-server.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 self.settings.tracking_uri, "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.home, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        _stop(proc, signal.SIGKILL)
        raise RuntimeError("mlflow server not up within 180 s")

    def s3_down(self, seconds: float = 24, concurrency: int = 4) -> None:
        """``refit serve`` on an S3 store (moto) under load; the endpoint is stopped at 6 s and back at 14 s."""
        import boto3
        import numpy as np

        from refit.store import S3Store
        from refit.bench.loadtest import Load, _client, _wait_ready

        name = "s3.down_under_load"
        moto_port, endpoint_port, serve_port = _free_port(), _free_port(), _free_port()
        endpoint = f"http://127.0.0.1:{endpoint_port}"
        self.progress(f"fault {name}: refit serve on S3 {endpoint} (moto behind a proxy), {concurrency} clients, "
                      f"endpoint stopped {seconds / 4:.0f}-{seconds * 7 / 12:.0f} s")
        keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        moto = self.helper("moto", str(moto_port), env=keys)
        proxy = self.helper("proxy", str(endpoint_port), str(moto_port))
        env = keys | {"REFIT_STORE": "s3", "REFIT_S3_ENDPOINT_URL": endpoint, "REFIT_S3_BUCKET": "refit-faults",
                      "REFIT_SERVE_PORT": str(serve_port), "REFIT_SERVE_LOG_FLUSH_SECONDS": "1",
                      "REFIT_SERVE_LOG_FLUSH_ROWS": "100", "REFIT_SERVE_POLL_SECONDS": "0",
                      "REFIT_SERVE_LOG_SPILL_DIR": str(self.home / "serving-spill")}
        url = f"http://127.0.0.1:{serve_port}"
        problems, notes = [], []
        servers = []
        try:
            _wait_listening(endpoint_port, proxy)
            deadline = time.monotonic() + 60
            s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1",
                              aws_access_key_id="bench", aws_secret_access_key="bench")
            while True:
                try:
                    s3.create_bucket(Bucket="refit-faults")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            proc, log, started = self.start("serve", "serve", env=env)
            servers.append(proc)
            _wait_ready(url, proc, timeout=300)
            load, stop = Load(), threading.Event()
            clients = [threading.Thread(target=_client, args=(url, self.texts, (1, 4), stop, load, i), daemon=True)
                       for i in range(concurrency)]
            t0 = time.monotonic()
            for client in clients:
                client.start()
            time.sleep(seconds / 4)
            _stop(proxy, signal.SIGKILL)
            down_at = time.monotonic() - t0
            time.sleep(seconds / 3)
            proxy = self.helper("proxy", str(endpoint_port), str(moto_port))
            _wait_listening(endpoint_port, proxy)
            up_at = time.monotonic() - t0
            time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
            stop.set()
            for client in clients:
                client.join(timeout=60)
            rc = _stop(proc)
            first = self.finish(proc, log, started, rc)
            status = np.array(load.status)
            answered = int(np.array(load.texts)[status == 200].sum())
            notes.append(f"{len(status)} requests, {answered} texts answered; endpoint down {down_at:.1f}-{up_at:.1f}"
                         f" s; server stopped with SIGTERM (exit {first.rc})")
            errors = int(((status >= 500) & (status != 503)).sum())
            if errors:
                problems.append(f"{errors} request(s) failed with 5xx or a dropped connection")
            spill = self.home / "serving-spill"
            spilled = len(list(spill.rglob("*.parquet"))) if spill.exists() else 0
            self.progress(f"recovery: refit serve restarted on the same spill directory ({spilled} part(s) there)")
            proc, log, started = self.start("serve-restart", "serve", env=env)
            servers.append(proc)
            _wait_ready(url, proc, timeout=300)
            store = S3Store("refit-faults", "", client=boto3.client(
                "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                aws_secret_access_key="bench"))
            prefix = f"inference/model={self.name}/"
            deadline = time.monotonic() + 90
            rows = _logged_rows(store, prefix)
            while rows < answered and time.monotonic() < deadline:
                time.sleep(1)
                rows = _logged_rows(store, prefix)
            _stop(proc)
            rows = _logged_rows(store, prefix)
            left = len(list(spill.rglob("*.parquet"))) if spill.exists() else 0
            notes.append(f"{spilled} part(s) spilled during the outage, {left} left after the restart; request-log "
                         f"rows {rows} / texts answered {answered}")
            self.rows_lost += max(0, answered - rows)
            if rows != answered:
                problems.append(f"request-log rows {rows} != texts answered {answered}")
        except Exception as exc:
            problems.append(f"the fault could not run: {type(exc).__name__}: {exc}")
        finally:
            for server in servers:
                _stop(server)
            _stop(proxy, signal.SIGKILL)
            _stop(moto, signal.SIGKILL)
        problems += self.champion_gated()
        self.record(name, problems, notes)

    # -- the whole run ---------------------------------------------------------------------------------------

    def run(self, only: list[str] | None = None) -> dict:
        chosen = [f for f in FAULTS if only is None or f in only]
        wanted = [f for f in chosen if f not in SAFETY_FAULTS]
        started = time.monotonic()
        self.prepare()
        self.champion_gated()
        for how in ("kill", "term"):
            points = [f.rsplit(".", 1)[1] for f in wanted if f.startswith(f"update.{how}.")]
            if how == "term":
                self._rest(wanted, before="update.term.")
                if points:
                    self.new_story("term")
            if points:
                self.update_series(how, points)
        self._rest(wanted, before=None)
        safety_faults = [f for f in chosen if f in SAFETY_FAULTS]
        if safety_faults and self.results:
            self.new_story("safety")  # their updates must be able to pass: a lineage with every domain new
        self._rest(safety_faults, before=None)
        final_running = self.running_runs()
        golden = self.golden_everywhere()
        return {
            "faults": [f.to_dict() for f in self.results],
            "champion_always_gated": self.champion_always_gated,
            "rows_lost": self.rows_lost,
            "labels_lost": self.labels_lost,
            "golden_consistent": not golden,
            "golden_problems": golden[:20],
            "runs_left_running": len(final_running),
            "passed": sum(f.passed for f in self.results),
            "failed": sum(not f.passed for f in self.results),
            "seconds": round(time.monotonic() - started, 1),
            "home": str(self.home),
        }

    def golden_everywhere(self) -> list[str]:
        """``golden_problems`` of every story this run told, each with its model's name."""
        from refit.settings import Settings

        here = (self.name, self.settings)
        problems = []
        for model in self.models:
            self.name, self.settings = model, Settings(home=self.home, model_name=model)
            problems += [f"{model}: {p}" for p in golden_problems(self)]
        self.name, self.settings = here
        return problems

    def _rest(self, wanted: list[str], before: str | None) -> None:
        """The faults other than the update series, in FAULTS order, up to the first named ``before``."""
        done = {f.name for f in self.results}
        for fault in wanted:
            if before and fault.startswith(before):
                return
            if fault in done or fault.startswith(("update.kill.", "update.term.")):
                continue
            if fault.startswith("rollback.kill."):
                self.rollback_fault(fault.rsplit(".", 1)[1])
            elif fault == "lock.expired_two_waiters":
                self.lock_fault()
            elif fault == "update.two_at_once":
                self.two_at_once()
            elif fault == "mlflow.down_mid_update":
                self.mlflow_down()
            elif fault == "s3.down_under_load":
                self.s3_down()
            elif fault in SAFETY_FAULTS:
                SAFETY_RUNS[fault](self)


SAFETY_RUNS = {"golden.race.rollback_between": safety.golden_race, "rollback.hand_after_server":
               safety.hand_after_server, "registry.fresh_store": safety.fresh_store,
               "lease.renew_store_error": safety.renew_store_error, "feedback.other_replica": safety.other_replica,
               "adopt.kill.after_register": safety.adopt_killed}


def run_benchmark(home: Path, only: list[str] | None, progress: Callable[[str], None]) -> dict:
    """Every fault (or those named in ``only``) in ``home``; the summary ``refit bench faults --json`` prints."""
    unknown = sorted(set(only or ()) - set(FAULTS))
    if unknown:
        from refit.errors import RefitError

        raise RefitError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    return Bench(home, progress, _fresh_model_name(home)).run(only)


def _fresh_model_name(home: Path) -> str:
    """A model name no earlier run in ``home`` used: each run tells its own story from a new bootstrap.

    A second run on the same home would otherwise start from the first's
    champion, whose lineage has learned the domains the faults need an
    update to pass on. Earlier runs stay in MLflow and the store.
    """
    run = 1
    while (home / "store" / "reference" / f"model=faults-{run}").exists():
        run += 1
    return f"faults-{run}"


def table(result: dict):
    from rich.markup import escape
    from rich.table import Table

    out = Table(title=f"refit bench faults: {result['passed']} passed, {result['failed']} failed, "
                      f"{result['seconds']:.0f} s")
    out.add_column("fault")
    out.add_column("passed")
    out.add_column("detail", overflow="fold")
    for fault in result["faults"]:
        out.add_row(fault["name"], "yes" if fault["passed"] else "[bold red]no[/]", escape(fault["detail"]))
    return out


# -- helper processes (python -m refit.bench.faults ROLE ...) ------------------------------------------------------


def _lock_role(role: str, out: Path, index: str = "") -> None:
    from refit.settings import Settings
    from refit.store import open_store
    from registry import versions
    from registry.tracking import configure

    settings = Settings()
    configure(settings)
    store = open_store(settings)
    name = settings.model_name
    if role == "lock-holder":
        with versions.promotion_lock(store, name, "bench holder", ttl_seconds=LOCK_TTL, wait_seconds=60) as lease:
            (out / "holder.json").write_text(json.dumps({"acquired": time.time(), "number": lease.number}))
            deadline = time.monotonic() + 600
            while not (out / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            try:
                lease.fence(name)
                verdict = "fenced: a stale holder could have written the aliases"
            except versions.PromotionConflict as exc:
                verdict = f"refused: {exc}"
        (out / "holder-final.json").write_text(json.dumps({"fence": verdict}))
        return
    with versions.promotion_lock(store, name, f"bench waiter {index}", ttl_seconds=LOCK_TTL,
                                 wait_seconds=120) as lease:
        acquired = time.time()
        time.sleep(1.0)
        fenced = True
        try:
            lease.fence(name)
        except versions.PromotionConflict:
            fenced = False
        released = time.time()
    (out / f"waiter-{index}.json").write_text(json.dumps({"acquired": acquired, "released": released,
                                                          "number": lease.number, "fenced": fenced}))


def _proxy(listen: int, target: int) -> None:
    """A TCP proxy: the S3 endpoint's address. Killing it is the endpoint going down; the data stays in moto."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen))
    server.listen(64)

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    while True:
        conn, _ = server.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", target), timeout=10)
            upstream.settimeout(None)
        except OSError:  # the endpoint behind is not answering: this client sees a closed connection, not a dead proxy
            conn.close()
            continue
        threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()


def main(argv: list[str]) -> None:
    role = argv[0]
    if role in ("lock-holder", "lock-waiter"):
        _lock_role(role, Path(argv[1]), argv[2] if len(argv) > 2 else "")
    elif role == "server-rollback":
        safety.server_rollback_role(int(argv[1]), int(argv[2]))
    elif role == "proxy":
        _proxy(int(argv[1]), int(argv[2]))
    elif role == "moto":
        from moto.server import main as moto_main

        moto_main(["-H", "127.0.0.1", "-p", argv[1]])
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
