"""The default tier's one end-to-end loop: `refit demo` on the smallest scenario that still drifts and gates.

One fresh process through the real CLI, its own REFIT_HOME (SQLite MLflow,
Prefect's temporary local API, the local store): bootstrap, a quiet window
that triggers nothing, a shifted window that is detected and updated, and a
poisoned hotfix that the gate refuses. The same story at larger size, on S3,
and read back from MLflow in depth, is tests/e2e/test_demo.py (the e2e tier).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke
SCENARIO = Path(__file__).resolve().parents[1] / "server" / "clinc-shift-tiny.yaml"


def test_the_loop_closes_on_the_tiny_scenario(tmp_path, data_dir):
    home = tmp_path / "home"
    env = os.environ | {"REFIT_HOME": str(home), "REFIT_DATA_DIR": str(data_dir), "REFIT_TORCH_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "refit.cli", "demo", "--json", "--scenario", str(SCENARIO)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert result["no_drift_window_triggered"] is False, result["no_drift_window_verdict"]
    assert result["drift_detected_on_shift"] is True
    assert result["update_promoted"] is True, result["update_verdict"]
    assert result["champion_after"] == result["champion_before"] + 1
    assert result["shifted_accuracy_after"] - result["shifted_accuracy_before"] >= 0.15
    assert result["golden_accuracy_before"] - result["golden_accuracy_after"] <= 0.02
    assert result["update_cpu_seconds"] > 0 and result["update_cost_usd"] > 0
    assert result["poisoned_hotfix_promoted"] is False
    assert result["poisoned_hotfix_verdict"].startswith("refuse:")

    from mlflow import MlflowClient

    # The demo's own registry, whatever registry URI an earlier test in this process left set.
    client = MlflowClient(result["mlflow_tracking_uri"], registry_uri=result["mlflow_tracking_uri"])
    champion = client.get_model_version_by_alias("intent-classifier", "champion")
    assert int(champion.version) == result["champion_after"]
    assert champion.tags["refit.parent_version"] == str(result["champion_before"])
    refused = [v for v in client.search_model_versions("name='intent-classifier'")
               if v.tags.get("refit.kind") == "hotfix"]
    assert [v.tags["refit.gate_verdict"] for v in refused] == ["refused"]
    assert list((home / "store" / "inference" / "model=intent-classifier").rglob("*.parquet"))

    from e2e import cascade_decision

    cascade_decision.check(result)  # the cheap tier was built, gated, and served exactly when its gate passed
