"""Who may feed an update what: labelled files only from REFIT_LABEL_SOURCES, gate policies only by name."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from refit.errors import RefitError
from refit.labels import check_source
from refit.settings import Settings
from tasks.gate import chosen_gate_policy
from tasks.ingest import read_labelled_file


def test_label_sources_allow_their_directories_and_prefixes_only(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "t-42").mkdir(parents=True)
    allowed = [str(inbox), "s3://labels/inbox/"]
    check_source(str(inbox / "t-42" / "fixes.csv"), allowed)
    check_source((inbox / "fixes.csv").as_uri(), allowed)
    check_source("s3://labels/inbox/t-42.csv", allowed)
    for outside in [str(tmp_path / "fixes.csv"), str(inbox / ".." / "fixes.csv"), "/etc/passwd",
                    "s3://labels/other/x.csv", "s3://labels/inboxed/x.csv", "s3://other/inbox/x.csv"]:
        with pytest.raises(RefitError, match="outside REFIT_LABEL_SOURCES"):
            check_source(outside, allowed)
    (inbox / "link").symlink_to(tmp_path)  # a link out of the inbox does not count as inside it
    with pytest.raises(RefitError, match="outside REFIT_LABEL_SOURCES"):
        check_source(str(inbox / "link" / "fixes.csv"), allowed)
    check_source("/anything/at/all.csv", None)  # unset: any readable file, as before


def test_the_hotfix_reader_applies_the_setting(tmp_path):
    outside = tmp_path / "fixes.csv"
    pd.DataFrame({"text": ["hi"], "label": ["greeting"]}).to_csv(outside, index=False)
    settings = Settings(home=tmp_path / "home", label_sources=str(tmp_path / "inbox"))
    with pytest.raises(RefitError, match="outside REFIT_LABEL_SOURCES"):
        read_labelled_file(str(outside), settings)
    # Before, a hotfix run could read any file the worker could; inside the sources it still reads.
    assert len(read_labelled_file(str(outside), Settings(home=tmp_path / "home", label_sources=str(tmp_path)))) == 1
    assert Settings(home=tmp_path / "home").allowed_label_sources(on_server=False) is None  # unset, no server
    # On a Prefect server the default is the inbox under REFIT_HOME and the store's inbox/.
    assert Settings(home=tmp_path / "home").allowed_label_sources(on_server=True) == [
        str((tmp_path / "home").resolve() / "inbox"), str((tmp_path / "home").resolve() / "store" / "inbox")]


def test_labels_import_cli_names_the_setting(tmp_path):
    outside = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": ["r1"], "label": ["x"]}).to_csv(outside, index=False)
    env = os.environ | {"REFIT_HOME": str(tmp_path / "home"), "REFIT_LABEL_SOURCES": str(tmp_path / "inbox")}
    proc = subprocess.run([sys.executable, "-m", "refit.cli", "labels", "import", str(outside)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "outside REFIT_LABEL_SOURCES" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_run_names_its_gate_policy_and_only_the_operator_pins_a_file(tmp_path):
    settings = Settings(home=tmp_path)
    assert chosen_gate_policy(None, settings) == "gate"
    assert chosen_gate_policy("strict", settings) == "strict"
    for path in ["/tmp/lax.yaml", "lax.yaml", "../policies/lax", "./lax"]:
        with pytest.raises(RefitError, match="pin it with REFIT_GATE_POLICY"):
            chosen_gate_policy(path, settings)
    pinned = Settings(home=tmp_path, gate_policy="/etc/refit/gate.yaml")
    assert chosen_gate_policy("/etc/refit/gate.yaml", pinned) == "/etc/refit/gate.yaml"
    assert chosen_gate_policy(None, pinned) == "/etc/refit/gate.yaml"


def test_a_monitor_run_names_its_drift_policy_and_only_the_operator_pins_a_file(tmp_path, monkeypatch,
                                                                                 prefect_harness):
    """A deployment run's ``policy`` parameter cannot point the monitor at any YAML file on the worker."""
    from flows.monitor import monitor

    monkeypatch.setenv("REFIT_HOME", str(tmp_path / "home"))
    from refit.policy import POLICY_DIR

    lax = tmp_path / "lax.yaml"
    lax.write_text((POLICY_DIR / "drift.yaml").read_text())
    state = monitor(policy=str(lax), return_state=True)
    assert state.is_failed() and "pin it with REFIT_DRIFT_POLICY" in state.message, state.message
    # The worker's own setting may name a file: then the run gets past the policy (to the missing champion).
    monkeypatch.setenv("REFIT_DRIFT_POLICY", str(lax))
    state = monitor(policy=str(lax), return_state=True)
    assert state.is_failed() and "no champion" in state.message, state.message


def test_update_cli_names_the_setting_before_anything_else(tmp_path):
    """What it must show: a file outside REFIT_LABEL_SOURCES gets exit 2 and a line naming the setting, even in a
    home with no champion yet (before, that home answered "no champion" and never named the setting)."""
    outside = tmp_path / "fixes.csv"
    pd.DataFrame({"text": ["hello"], "label": ["greeting"]}).to_csv(outside, index=False)
    env = os.environ | {"REFIT_HOME": str(tmp_path / "home"), "REFIT_LABEL_SOURCES": str(tmp_path / "inbox"),
                        "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    proc = subprocess.run([sys.executable, "-m", "refit.cli", "update", "--labels", str(outside)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "outside REFIT_LABEL_SOURCES" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
