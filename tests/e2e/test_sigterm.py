"""SIGTERM, as Kubernetes, systemd and `timeout` send it first, while refit trains.

A command sent SIGTERM must stop its training at once, close its MLflow runs KILLED (an update's charged to the month's
budget), stop its temporary Prefect API and exit non-zero, leaving no process.
"At once" is measured in training progress, not seconds, so a loaded machine
cannot fail it: after the signal, training logs at most one more of its
progress marks (one per tenth of the run). A generous wall-clock bound
(``EXIT_WITHIN``) only catches a command that hangs on its way out.
Without the KILLED-and-charged close the update test fails: its runs end
FAILED and the update is charged nothing (``update_cost_usd`` missing), so
the month's ledger never sees the machine time.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from refit import processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
SCENARIO = REPO / "tests" / "server" / "clinc-shift-tiny.yaml"
STEP = re.compile(r"fine-tune: step \d+/\d+")
EXIT_WITHIN = 120  # seconds from SIGTERM to exit: a hang, not a slow machine (it takes a few seconds when idle)


def _env(home: Path, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "REFIT_"))}
    return env | {"REFIT_HOME": str(home), "REFIT_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1",
                  "DO_NOT_TRACK": "1", "REFIT_TORCH_THREADS": "1"}


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "refit.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))


def _wait_for_training(proc: subprocess.Popen, log: Path, after: str = "") -> None:
    pattern = re.compile(re.escape(after) + r".*fine-tune: step", re.S)
    deadline = time.monotonic() + 900
    while not pattern.search(log.read_text(errors="replace")):
        assert proc.poll() is None, f"ended before training (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


def _terminate(proc: subprocess.Popen, log: Path) -> tuple[int, float, list[int], int]:
    """SIGTERM the command alone (not its group): its exit code, seconds to exit, what it left running, and how
    many training progress marks it logged after the signal."""
    tree = [proc.pid, *processes.descendants(proc.pid)]
    marks_before = len(STEP.findall(log.read_text(errors="replace")))
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=EXIT_WITHIN + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {EXIT_WITHIN + 60} s after SIGTERM")
    took = time.monotonic() - started
    deadline = time.monotonic() + 60  # the orphan guard stops the temporary API as soon as it sees its parent gone
    while time.monotonic() < deadline and any(processes.alive(p) for p in tree):
        time.sleep(0.2)
    marks_after = len(STEP.findall(log.read_text(errors="replace"))) - marks_before
    return code, took, [p for p in tree if processes.alive(p)], marks_after


def _runs(home: Path) -> list[tuple]:
    with sqlite3.connect(home / "mlflow.db") as db:
        return db.execute(
            "select r.run_uuid, r.name, r.status, "
            "(select value from tags t where t.run_uuid = r.run_uuid and t.key = 'refit.run_type'), "
            "(select value from metrics m where m.run_uuid = r.run_uuid and m.key = 'update_cost_usd'), "
            "(select value from metrics m where m.run_uuid = r.run_uuid and m.key = 'estimate_cost_usd') "
            "from runs r").fetchall()


def test_bootstrap_sent_sigterm_while_training_stops_at_once_and_leaves_no_process(tmp_path, data_dir):
    home, log = tmp_path / "home", tmp_path / "bootstrap.log"
    proc = _start(["bootstrap", "--scenario", str(SCENARIO)], _env(home, data_dir), log)
    _wait_for_training(proc, log)
    code, took, left, marks_after = _terminate(proc, log)
    assert code != 0
    assert marks_after <= 1, log.read_text()[-3000:]  # the step in flight at most, not the rest of the run
    assert took <= EXIT_WITHIN, took
    assert not left, [(p, processes.cmdline(p)) for p in left]
    statuses = {name: status for _, name, status, *_ in _runs(home)}
    assert statuses.get("bootstrap") == "KILLED", statuses


def test_update_sent_sigterm_while_training_closes_its_runs_killed_and_charged(tmp_path, data_dir):
    from refit.data import load_clinc150

    home, env = tmp_path / "home", _env(tmp_path / "home", data_dir)
    done = subprocess.run([sys.executable, "-m", "refit.cli", "bootstrap", "--scenario", str(SCENARIO)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    clinc = load_clinc150(data_dir)
    travel = clinc[(clinc["split"] == "train") & clinc["group"].isin(["travel", "utility"])]
    labels = tmp_path / "fixes.csv"
    travel.groupby("label").head(20)[["text", "label"]].to_csv(labels, index=False)

    log = tmp_path / "update.log"
    proc = _start(["update", "--labels", str(labels), "--reason", "sigterm test"], env, log)
    _wait_for_training(proc, log, after="for flow 'update'")
    code, took, left, marks_after = _terminate(proc, log)
    assert code != 0
    assert marks_after <= 1, log.read_text()[-3000:]
    assert took <= EXIT_WITHIN, took
    assert not left, [(p, processes.cmdline(p)) for p in left]

    runs = _runs(home)
    updates = [r for r in runs if r[3] == "update"]
    assert len(updates) == 1, runs
    _, _, status, _, charged, estimate = updates[0]
    assert status == "KILLED", runs
    assert charged is not None and estimate is not None and charged >= estimate > 0, runs  # the machine time is on the ledger
    assert not [r for r in runs if r[2] in ("RUNNING", "FAILED")], runs  # its attempts are closed KILLED too
    assert "closed KILLED, charged" in log.read_text()

    # The same file again trains (the stopped update does not count as done) and ends in a verdict.
    again = subprocess.run([sys.executable, "-m", "refit.cli", "update", "--labels", str(labels), "--json"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "duplicate_of" not in again.stdout.strip().splitlines()[-1]
    assert not [r for r in _runs(home) if r[2] == "RUNNING"]
