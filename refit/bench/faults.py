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

This module is the run (``Bench``: its children, its reads of MLflow, its
checks, its data) and the helper processes' entry point. The faults are
plain functions of a ``Bench`` beside it: ``faults_kills`` (stopped updates
and rollbacks, the expired lock, two updates at once), ``faults_outages``
(MLflow and S3 going away) and ``faults_safety`` (what fails quietly);
``faults_results`` holds what they record.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from refit.bench import faults_kills as kills
from refit.bench import faults_outages as outages
from refit.bench import faults_safety as safety
from refit.bench.children import stop_child
from refit.bench.faults_results import Child, Fault, Pending, now_ms
from refit.bench.faults_safety import SAFETY_FAULTS, golden_problems

GATED = {"passed", "bootstrap (no gate)"}
SCENARIO = "clinc-faults"
UPDATE_POINTS = ("after_train", "after_register", "reference_write", "before_promote", "promote", "after_promote")
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

# Every child of this bench runs in a session of its own: a stop signals its whole group.
_stop = functools.partial(stop_child, group=True)


def _version_of(problem: str) -> str:
    """``"previous v5 is tagged ..."`` -> ``"v5 is tagged ..."``: one version's problem, whichever alias it holds now."""
    return problem.split(" ", 1)[1] if problem.startswith(("champion v", "previous v")) else problem


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
        started = now_ms()
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
        return Child(rc, (now_ms() - started) / 1000, log, started, now_ms(), result)

    def spawn(self, label: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        """``python ARGV`` in a session of its own, left running; its output goes to a log file of its own."""
        self.steps += 1
        log = open(self.logs / f"{self.steps:02d}-{label}.log", "w")
        proc = subprocess.Popen([sys.executable, *argv], env=self.env | (env or {}), stdout=log,
                                stderr=subprocess.STDOUT, cwd=self.home, start_new_session=True)
        log.close()
        return proc

    def helper(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        """``python -m refit.bench.faults ARGS``: a lock holder or waiter, or the S3 endpoint's proxy."""
        return self.spawn(args[0], ["-m", "refit.bench.faults", *args], env)

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
        expected_total, problems = 0.0, []
        for run in updates:
            attempts = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' "
                                                           "and tags.`refit.run_type` = 'update-attempt'")
            metered = sum(a.data.metrics.get("update_cost_usd", 0.0) for a in attempts)
            unmetered = [a for a in attempts if "update_cost_usd" not in a.data.metrics]
            # What this run should have charged the ledger: what its attempts metered, a killed one its estimate.
            expected_charge = metered + sum(
                a.data.metrics.get("estimate_cost_usd", run.data.metrics.get("estimate_cost_usd", 0.0))
                for a in unmetered)
            charged = run.data.metrics.get("update_cost_usd")
            reserved = run.data.metrics.get("reserved_usd", 0.0)
            if charged is not None and "update_cpu_seconds" in run.data.metrics and charged + 1e-9 >= metered:
                expected_charge = charged  # finished: charged the whole update (every stage), at least its attempts
            elif charged is not None and expected_charge - 1e-9 <= charged <= max(expected_charge, reserved) + 1e-9:
                expected_charge = charged  # killed: charged up to its reservation, which covers the update's estimate
            expected_total += expected_charge
            in_window = run.info.start_time >= since_ms and (until_ms is None or run.info.start_time <= until_ms)
            if in_window and (charged is None or abs(charged - expected_charge) > 1e-9 + 1e-6 * expected_charge):
                what = "nothing" if charged is None else f"${charged:.6f}"
                problems.append(f"update run {run.info.run_id[:8]} charged {what} to the ledger, its attempts "
                                f"cost ${expected_charge:.6f} ({len(unmetered)} killed before metering, charged their "
                                "estimate)")
        return problems, ledger, expected_total

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

    # -- the whole run ---------------------------------------------------------------------------------------

    def run(self, only: list[str] | None = None) -> dict:
        """Every fault of ``only`` (default: all) in FAULTS order, the update series first; the summary."""
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
                kills.update_series(self, how, points)
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
                kills.rollback_fault(self, fault.rsplit(".", 1)[1])
            elif fault in RUNS:
                RUNS[fault](self)


SAFETY_RUNS = {"golden.race.rollback_between": safety.golden_race, "rollback.hand_after_server":
               safety.hand_after_server, "registry.fresh_store": safety.fresh_store,
               "lease.renew_store_error": safety.renew_store_error, "feedback.other_replica": safety.other_replica,
               "adopt.kill.after_register": safety.adopt_killed}
# The faults run one at a time by name (the update series and the rollback kills take a stage point as well).
RUNS = {"lock.expired_two_waiters": kills.lock_fault, "update.two_at_once": kills.two_at_once,
        "mlflow.down_mid_update": outages.mlflow_down, "s3.down_under_load": outages.s3_down} | SAFETY_RUNS


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


def main(argv: list[str]) -> None:
    """``python -m refit.bench.faults ROLE ARGS``: a helper process a fault starts (``Bench.helper``)."""
    role = argv[0]
    if role in ("lock-holder", "lock-waiter"):
        kills.lock_role(role, Path(argv[1]), argv[2] if len(argv) > 2 else "")
    elif role == "server-rollback":
        safety.server_rollback_role(int(argv[1]), int(argv[2]))
    elif role == "proxy":
        outages.proxy_role(int(argv[1]), int(argv[2]))
    elif role == "moto":
        outages.moto_role(argv[1])
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
