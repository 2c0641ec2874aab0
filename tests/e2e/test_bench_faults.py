"""``refit bench faults`` through the CLI, on its cheapest faults: the bench's own code, real child processes.

The paused lock holder and its two waiters need only the bootstrap; the update
SIGKILLed right after training needs one partial update and the next update
that recovers from it; the store that lost its fence needs a story of its own
(a second bootstrap) and one update that must still promote. Each must pass, and the summary must say so in the
keys a script reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.faults, pytest.mark.timeout(1800)]

CHEAP = ["lock.expired_two_waiters", "update.kill.after_train", "registry.fresh_store"]


def test_cheapest_faults_pass_and_the_summary_says_so(tmp_path, data_dir):
    env = os.environ | {"REFIT_DATA_DIR": str(data_dir), "REFIT_TORCH_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "refit.cli", "bench", "faults", "--home", str(tmp_path / "home"),
                           "--only", ",".join(CHEAP), "--json"], env=env, capture_output=True, text=True,
                          timeout=1700)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) >= {"faults", "champion_always_gated", "rows_lost", "runs_left_running", "labels_lost",
                           "golden_consistent"}
    by_name = {fault["name"]: fault for fault in result["faults"]}
    assert sorted(by_name) == sorted(CHEAP)
    for name in CHEAP:
        assert by_name[name]["passed"], by_name[name]["detail"]
    assert result["champion_always_gated"] is True
    assert result["runs_left_running"] == 0
    assert result["rows_lost"] == 0 and result["labels_lost"] == 0
    assert result["golden_consistent"] is True, result["golden_problems"]
    # The killed update's own child was really killed at its fault point, and the fault said so.
    assert "exit -9" in by_name["update.kill.after_train"]["detail"]
    for name in CHEAP:  # one progress line per fault on stderr
        assert f"fault {name}" in proc.stderr


def test_unknown_fault_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "refit.cli", "bench", "faults", "--home", str(tmp_path),
                           "--only", "update.kill.nowhere"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown fault(s) update.kill.nowhere" in proc.stderr
