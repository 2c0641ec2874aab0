"""`refit drift` and `refit bench drift` as a user runs them: a subprocess, files on disk, no server.

The files are CLINC150 windows drawn the way the benchmark draws them
(``refit.bench.drift``): a 1,000-text reference of the scenario's five
domains plus ``oos`` from the training split, and a window of other texts
(from the same split where a test needs a quiet window).
True intents stand in for predictions here: these tests are about the
command, not about how well a champion's outputs reveal drift.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refit.bench import drift as bench_drift
from refit.cli import _int_list
from refit.errors import RefitError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def refit(*args: str | Path, timeout: float = 300, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFIT_")}
    env |= {"DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    if home is not None:
        env["REFIT_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "refit.cli", *map(str, args)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


@pytest.fixture(scope="module")
def pools(data_dir) -> bench_drift.Pools:
    return bench_drift.load_pools(data_dir)


def served(rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    return pd.DataFrame({"text": rows["text"].to_numpy(), "predicted_label": rows["label"].to_numpy(),
                         "confidence": np.random.default_rng(seed).uniform(0.6, 1.0, len(rows))})


def served_pair(pools, size: int, index: int, kind: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    reference, current = bench_drift.pair_rows(pools, size, index, kind)
    return served(reference, index), served(current, index + 1)


def same_split_pair(pools, size: int, index: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A reference and a quiet window drawn from the same rows (training-split texts the champion never saw).

    The benchmark's quiet windows come from CLINC150's other splits, which
    differ in phrasing by a small effect that the calibrated text signal may
    flag; a window from the reference's own collection is quiet by design.
    """
    reference, _ = bench_drift.pair_rows(pools, size, index, bench_drift.QUIET)
    rest = pools.reference.drop(reference.index)
    current = rest.iloc[np.random.default_rng(index).choice(len(rest), size, replace=False)]
    return served(reference, index), served(current, index + 1)


def renamed(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns as another team might name them, with the true intent as a label column."""
    renamed_ = frame.rename(columns={"text": "utterance", "predicted_label": "intent"})
    return renamed_.assign(label=frame["predicted_label"])


def test_same_distribution_window_is_not_drift_and_bad_rows_are_counted(pools, tmp_path):
    reference, current = same_split_pair(pools, 500, index=0)
    current = renamed(current)
    current.insert(0, "request_id", [f"r{i}" for i in range(len(current))])
    bad = pd.DataFrame({"request_id": ["x1", "x2", "r0"], "utterance": ["", "   ", "a duplicate of r0's id"],
                        "intent": ["balance"] * 3, "confidence": [0.9] * 3, "label": ["balance"] * 3})
    pd.concat([current, bad], ignore_index=True).to_csv(tmp_path / "window.csv", index=False)
    renamed(reference).to_parquet(tmp_path / "reference.parquet")

    proc = refit("drift", tmp_path / "reference.parquet", tmp_path / "window.csv", "--json",
                 "--text-column", "utterance", "--prediction-column", "intent")
    verdict = last_json(proc)

    assert (verdict["drift_detected"], verdict["severity"]) == (False, "none"), verdict
    assert set(verdict["signals"]) >= {"text", "prediction", "confidence"}
    for signal in verdict["signals"].values():
        assert set(signal) >= {"value", "threshold", "drifted"} and not signal["drifted"]
    assert verdict["rows_checked"] == 503 == verdict["rows_kept"] + verdict["rows_quarantined"]
    assert verdict["rows_quarantined"] == 3
    # an empty CSV cell reads as a missing text, a blank one as empty
    assert verdict["quarantine_reasons"] == {"text is missing": 1, "text is empty": 1, "duplicate request_id": 1}
    assert (verdict["rows_current"], verdict["rows_reference"]) == (500, 1000)
    assert verdict["signals_skipped"] == {}
    assert verdict["labels"]["current_labelled_rows"] == 500
    assert "embedding_novelty" in proc.stderr  # with --json the table goes to stderr

    # The reference's embeddings and calibration were kept beside it; the next check reads them (and imports only
    # what it uses).
    sidecar = tmp_path / "reference.parquet.embeddings.npz"
    calibration = tmp_path / "reference.parquet.calibration.json"
    written = sidecar.stat().st_mtime_ns, calibration.stat().st_mtime_ns
    assert verdict["signals"]["text"]["details"]["calibration"] == "computed"
    again = refit_reporting_imports("drift", tmp_path / "reference.parquet", tmp_path / "window.csv", "--json",
                                    "--text-column", "utterance", "--prediction-column", "intent")
    repeated = last_json(again)
    assert repeated["signals"]["text"]["details"].pop("calibration") == "kept with the reference"
    verdict["signals"]["text"]["details"].pop("calibration")
    assert repeated == verdict
    assert (sidecar.stat().st_mtime_ns, calibration.stat().st_mtime_ns) == written
    assert "computing them again" not in again.stderr
    assert "heavy imports: []" in again.stderr, again.stderr[-2000:]


def refit_reporting_imports(*args: str | Path, home: Path | None = None) -> subprocess.CompletedProcess:
    """``refit`` run as ``refit(...)`` runs it, saying at exit which heavy modules it imported."""
    heavy = ("prefect", "mlflow", "evidently", "transformers", "torch", "sklearn", "scipy.stats")
    code = ("import atexit, sys; from refit.cli import main; "
            f"atexit.register(lambda: print('heavy imports:', [m for m in {heavy!r} if m in sys.modules], "
            "file=sys.stderr)); "
            f"sys.argv = ['refit', *{[str(a) for a in args]!r}]; main()")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFIT_")}
    env |= {"DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    if home is not None:
        env["REFIT_HOME"] = str(home)
    return subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_window_is_embedded_on_onnx_runtime_from_a_graph_kept_under_refit_home(pools, tmp_path):
    """First check: the encoder's graph is built from its weights into REFIT_HOME/cache/encoders, without torch;
    later ones read it. A broken file is built again; where none can be written, torch embeds and the verdict
    agrees."""
    reference, current = served_pair(pools, 300, index=5, kind=bench_drift.SHIFTED)
    reference.to_parquet(tmp_path / "reference.parquet")
    current.to_parquet(tmp_path / "window.parquet")
    home = tmp_path / "home"
    files = (tmp_path / "reference.parquet", tmp_path / "window.parquet", "--json", "--no-embeddings-cache")

    built = refit_reporting_imports("drift", *files, home=home)
    first = last_json(built)
    [graph] = (home / "cache" / "encoders").glob("*.onnx")
    again = refit_reporting_imports("drift", *files, home=home)
    graph.write_bytes(graph.read_bytes()[:4096])  # cut short, as by a full disk
    repaired = refit("drift", *files, home=home)
    (tmp_path / "not-a-folder").write_text("REFIT_HOME is a file: no graph can be kept under it")
    on_torch = refit("drift", *files, home=tmp_path / "not-a-folder")

    assert "heavy imports: []" in built.stderr, built.stderr[-2000:]  # the build itself needs no torch
    assert last_json(again) == first
    assert "heavy imports: []" in again.stderr, again.stderr[-2000:]
    assert "does not open" in repaired.stderr and "building it again" in repaired.stderr
    assert last_json(repaired) == first and graph.stat().st_size > 10_000_000
    assert "not built for ONNX Runtime" in on_torch.stderr and "embedding with torch" in on_torch.stderr
    torch_verdict = last_json(on_torch)
    assert (torch_verdict["drift_detected"], torch_verdict["severity"]) == (first["drift_detected"], first["severity"])
    assert first["drift_detected"]  # a shifted window: the text signal has something to measure
    for name, signal in first["signals"].items():
        other = torch_verdict["signals"][name]
        assert other["drifted"] == signal["drifted"], name
        assert other["value"] == pytest.approx(signal["value"], abs=1e-5), name


def test_a_changed_reference_is_embedded_again(pools, tmp_path):
    reference, current = served_pair(pools, 300, index=4, kind=bench_drift.QUIET)
    current.to_parquet(tmp_path / "window.parquet")
    reference.to_parquet(tmp_path / "reference.parquet")
    sidecar = tmp_path / "reference.parquet.embeddings.npz"
    sidecar.write_bytes(b"left by something else")

    first_proc = refit("drift", tmp_path / "reference.parquet", tmp_path / "window.parquet", "--json")
    first = last_json(first_proc)
    reference.iloc[:-100].to_parquet(tmp_path / "reference.parquet")
    kept = sidecar.read_bytes()
    changed = refit("drift", tmp_path / "reference.parquet", tmp_path / "window.parquet", "--json")
    without = last_json(refit("drift", tmp_path / "reference.parquet", tmp_path / "window.parquet", "--json",
                              "--no-embeddings-cache"))

    assert "are unreadable: computing them again" in first_proc.stderr
    assert "are stale: computing them again" in changed.stderr
    assert sidecar.read_bytes() != kept  # rewritten for the new reference
    assert last_json(changed)["signals"]["text"]["value"] == pytest.approx(without["signals"]["text"]["value"],
                                                                          abs=1e-6)
    assert first["rows_reference"] == 1000 and last_json(changed)["rows_reference"] == 900


def test_forty_percent_shifted_window_is_drift(pools, tmp_path):
    rng = np.random.default_rng(40)
    reference = served(bench_drift.reference_rows(pools, rng), 0)
    current = served(bench_drift.window_rows(pools, 500, rng, shift_share=0.4), 1)
    reference.to_json(tmp_path / "reference.jsonl", orient="records", lines=True)
    current.to_parquet(tmp_path / "window.parquet")

    verdict = last_json(refit("drift", tmp_path / "reference.jsonl", tmp_path / "window.parquet", "--json"))

    assert verdict["drift_detected"] and verdict["severity"] == "high", verdict
    assert verdict["signals"]["text"]["drifted"] and verdict["signals"]["prediction"]["drifted"]
    assert verdict["rows_checked"] == 500 and verdict["rows_quarantined"] == 0


def test_without_json_a_table_is_printed_and_absent_default_columns_are_skipped(pools, tmp_path):
    reference, current = served_pair(pools, 300, index=1, kind=bench_drift.SHIFTED)
    reference[["text", "predicted_label"]].to_csv(tmp_path / "reference.csv", index=False)
    current[["text", "predicted_label"]].to_csv(tmp_path / "window.csv", index=False)

    proc = refit("drift", tmp_path / "reference.csv", tmp_path / "window.csv")

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Drift check:" in proc.stdout and "label_shift" in proc.stdout
    assert "skipped: no column 'confidence'" in proc.stdout
    assert not proc.stdout.strip().splitlines()[-1].startswith("{")


def test_a_reference_scored_on_held_out_rows_lets_the_champion_signals_count(pools, tmp_path):
    reference, current = same_split_pair(pools, 500, index=2)
    current = current.assign(confidence=current["confidence"] - 0.3)
    current.to_parquet(tmp_path / "window.parquet")
    reference.to_parquet(tmp_path / "trained_on.parquet")
    reference.assign(scored_on="held_out").to_parquet(tmp_path / "held_out.parquet")

    trained_on = last_json(refit("drift", tmp_path / "trained_on.parquet", tmp_path / "window.parquet", "--json"))
    held_out = last_json(refit("drift", tmp_path / "held_out.parquet", tmp_path / "window.parquet", "--json"))

    assert trained_on["signals"]["performance_estimate"]["drifted"]
    assert not trained_on["signals"]["performance_estimate"]["counts_toward_verdict"]
    assert trained_on["severity"] == "none", trained_on
    assert held_out["signals"]["performance_estimate"]["counts_toward_verdict"]
    assert not held_out["signals"]["confidence_drop"]["counts_toward_verdict"]  # reported, never counted
    assert (held_out["drift_detected"], held_out["severity"]) == (True, "low"), held_out


@pytest.mark.parametrize("option, column, side", [
    ((), "text", "reference"),
    (("--text-column", "utterance", "--prediction-column", "predicted"), "predicted", "current"),
    (("--text-column", "utterance", "--label-column", "gold"), "gold", "reference"),
])
def test_missing_column_is_one_line_naming_it(tmp_path, option, column, side):
    pd.DataFrame({"utterance": ["hi", "there"], "predicted_label": ["a", "b"], "predicted": ["a", "b"]}).to_csv(
        tmp_path / "reference.csv", index=False)
    pd.DataFrame({"utterance": ["hi", "you"], "predicted_label": ["a", "b"]}).to_csv(tmp_path / "window.csv",
                                                                                     index=False)

    line = one_line_error(refit("drift", tmp_path / "reference.csv", tmp_path / "window.csv", *option))

    assert f"no column {column!r}" in line and f"{side} file" in line


def test_missing_file_is_one_line(tmp_path):
    pd.DataFrame({"text": ["hi"]}).to_csv(tmp_path / "reference.csv", index=False)

    line = one_line_error(refit("drift", tmp_path / "reference.csv", tmp_path / "nowhere.parquet", "--json"))

    assert "nowhere.parquet does not exist" in line


def test_empty_file_is_one_line(tmp_path):
    pd.DataFrame({"text": ["hi"]}).to_csv(tmp_path / "reference.csv", index=False)
    (tmp_path / "window.csv").write_text("text,predicted_label\n")
    (tmp_path / "blank.csv").write_text("")

    assert "current file" in one_line_error(refit("drift", tmp_path / "reference.csv", tmp_path / "window.csv"))
    assert "blank.csv" in one_line_error(refit("drift", tmp_path / "reference.csv", tmp_path / "blank.csv"))


def test_window_with_too_few_usable_rows_is_rejected_with_its_reasons(tmp_path):
    pd.DataFrame({"text": [f"text {i}" for i in range(400)]}).to_csv(tmp_path / "reference.csv", index=False)
    pd.DataFrame({"text": ["fine"] * 250 + [""] * 100}).to_csv(tmp_path / "window.csv", index=False)

    line = one_line_error(refit("drift", tmp_path / "reference.csv", tmp_path / "window.csv", "--json"))

    assert "window rejected: 250 usable rows of 350" in line and "at least 300" in line
    assert "100 quarantined" in line and "text is missing" in line


# --- the benchmark ------------------------------------------------------------------------------------


def test_benchmark_pairs_are_repeatable_and_shaped_as_described(pools, data_dir):
    reference, quiet = bench_drift.pair_rows(pools, 500, index=3, kind=bench_drift.QUIET)
    again, quiet_again = bench_drift.pair_rows(pools, 500, index=3, kind=bench_drift.QUIET)
    _, shifted = bench_drift.pair_rows(pools, 500, index=3, kind=bench_drift.SHIFTED)
    _, natural = bench_drift.pair_rows(pools, 500, index=3, kind=bench_drift.NATURAL)

    pd.testing.assert_frame_equal(quiet, quiet_again)
    pd.testing.assert_frame_equal(reference, again)
    assert (len(reference), len(quiet), len(shifted), len(natural)) == (1000, 500, 500, 500)
    # the reference is training-split text the champion never trained on
    assert set(reference["text"]).issubset(set(pools.reference["text"]))
    assert not set(reference["text"]) & set(pools.train["text"])
    assert not set(quiet["text"]) & set(reference["text"])  # other texts ...
    assert set(quiet["label"]).issubset(set(pools.label_shares.index))  # ... of the same intents
    unseen = ~shifted["text"].isin(pools.quiet["text"])
    assert unseen.sum() == 150 and set(shifted["label"][unseen]).isdisjoint(set(pools.label_shares.index))
    # quiet windows keep the training split's out-of-scope share (1.3%), the validation mix has more
    assert (quiet["label"] == "oos").mean() < 0.03 < (natural["label"] == "oos").mean()
    within = bench_drift.load_pools(data_dir, "within")
    assert set(within.shifted["group"]) == set(within.quiet["group"]) - {"oos"}  # same domains ...
    assert set(within.shifted["label"]).isdisjoint(set(within.quiet["label"]))  # ... other intents


def test_int_list_option():
    assert _int_list("200,500, 2000", "--sizes") == [200, 500, 2000]
    assert _int_list("100_000", "--scale") == [100_000]
    assert _int_list("", "--scale") == [] and _int_list("none", "--scale") == []
    with pytest.raises(RefitError, match="--sizes"):
        _int_list("200,lots", "--sizes")


@pytest.mark.e2e  # trains a champion and embeds thousands of texts: the slow tier's, not the default one's
def test_bench_drift_prints_one_json_object_last(tmp_path, data_dir):
    proc = refit("bench", "drift", "--json", "--pairs", "2", "--sizes", "500", "--families", "within",
                 "--gradual", "10", "--scale", "2000,4000", "--baseline-pairs", "1", timeout=900)
    result = last_json(proc)

    rows = {(r["mode"], r["shift_share"]): r for r in result["results"]}
    assert set(rows) == {("text", 0.1), ("text", 0.3), ("champion", 0.1), ("champion", 0.3)}
    for (mode, share), row in rows.items():
        assert row["family"] == "within" and row["size"] == 500 and row["pairs"] == 2
        assert row["quiet"]["detected"] == 0, row  # seeded pairs: these two quiet windows are quiet ...
        if share == 0.3:
            # ... every shifted window reads more novel text than any quiet one ...
            assert row["shifted"]["signal_range"]["text"][0] > row["quiet"]["signal_range"]["text"][1], row
    assert rows[("champion", 0.3)]["shifted"]["detected"] == 2  # ... and with the champion's outputs, both fire
    assert rows[("text", 0.3)]["evidently_default"]["pairs"] == 1
    # a real champion: it errs on held-out rows, which true labels standing in for predictions never do
    champion = result["champion"]["within"]
    assert 0.8 < champion["held_out_accuracy"] < 1.0 and champion["labels"] == 101
    assert "confidence_drop" in rows[("champion", 0.3)]["shifted"]["signal_range"]
    assert "confidence_drop" not in rows[("text", 0.3)]["shifted"]["signal_range"]
    runs = result["scale"]["runs"]
    assert [r["rows"] for r in runs] == [2000, 4000]
    assert all(r["rows_sampled"] == result["setup"]["max_sample_rows"] for r in runs)
    assert not any(r["drift_detected"] for r in runs)  # quiet windows, however large
    assert "Drift check on CLINC150" in proc.stderr and "Drift check cost" in proc.stderr


def test_bench_module_imports_nothing_heavy():
    code = ("import refit.bench.drift, sys; "
            "print([m for m in ('prefect', 'torch', 'mlflow', 'evidently') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stderr[-2000:]
