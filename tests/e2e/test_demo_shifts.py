"""Shift after shift through the real CLI: every update judged on what production has.

One demo run on a three-shift scenario at reduced size (the second and third
shifts go to domains v1 never saw), on the local store with a SQLite MLflow
store and Prefect's temporary API. Then the store and the registry it left
are read back as a reviewer would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.e2e
REFIT = [sys.executable, "-m", "refit.cli"]
SCENARIO = Path(__file__).with_name("clinc-three-shifts-small.yaml")
MODEL = "intent-classifier"


@pytest.fixture(scope="module")
def three_shifts(tmp_path_factory, data_dir):
    home = tmp_path_factory.mktemp("demo-shifts")
    env = os.environ | {"REFIT_HOME": str(home), "REFIT_DATA_DIR": str(data_dir)}
    proc = subprocess.run(REFIT + ["demo", "--json", "--scenario", str(SCENARIO)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return home, json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_shift_is_detected_and_promoted_new_labels_included(three_shifts):
    _, result = three_shifts
    shifts = result["shifts"]
    assert [s["name"] for s in shifts] == ["commute", "utility", "meta"]
    for shift in shifts:
        assert shift["drift_detected"] and shift["promoted"], (shift["name"], shift["verdict"])
        assert shift["fresh_accuracy_after"] > shift["fresh_accuracy_before"]
        assert shift["external_accuracy_after"] - shift["external_accuracy_before"] >= 0.30, shift
    # The second and third shifts were promoted after the first: before, the first shift's set refused them.
    assert [s["version"] for s in shifts] == [result["champion_before"] + k for k in (1, 2, 3)]
    assert shifts[0]["new_labels"] == 0
    assert shifts[1]["new_labels"] >= 10 and shifts[2]["new_labels"] >= 10
    # Labels v1 could never answer: the champion before each of those shifts scored 0 on its new intents.
    assert shifts[1]["external_accuracy_before"] <= 0.05
    assert result["poisoned_hotfix_promoted"] is False and not result["no_drift_window_triggered"]
    assert result["golden_accuracy_before"] - result["golden_accuracy_after"] <= 0.02
    assert set(result["external_accuracy_final"]) == {"commute", "utility", "meta"}


def test_golden_suite_grows_with_each_promotion_and_versions_record_it(three_shifts):
    home, result = three_shifts
    from mlflow import MlflowClient

    from refit.data import fingerprint

    golden_dir = home / "store" / "evaluation" / f"model={MODEL}" / "golden"
    suites = {int(p.stem.split("=")[1]): pd.read_parquet(p) for p in golden_dir.glob("version=*.parquet")}
    assert sorted(suites) == [1, 2, 3, 4]  # bootstrap's, then one per promoted update
    sizes = [len(suites[k]) for k in sorted(suites)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert json.loads((golden_dir / "current.json").read_text())["version"] == 4
    utility = result["shifts"][1]
    # The utility update's fresh holdout joined the suite: its new labels are judged from then on.
    assert suites[3]["added"].max() == 3 and suites[3]["label"].nunique() > suites[2]["label"].nunique()

    client = MlflowClient(result["mlflow_tracking_uri"])
    for k, shift in enumerate(result["shifts"], start=1):
        tags = client.get_model_version(MODEL, str(shift["version"])).tags
        assert tags["refit.golden_version"] == str(k)
        assert tags["refit.golden_fingerprint"] == fingerprint(suites[k])
        assert tags["refit.golden_after_fingerprint"] == fingerprint(suites[k + 1])
        assert int(tags["refit.new_labels"]) == shift["new_labels"]
    learned = client.get_model_version(MODEL, str(utility["version"])).tags["refit.labels_learned"].split(", ")
    assert len(learned) == utility["new_labels"]
    assert set(learned) <= set(suites[3]["label"])
