"""Drift-check benchmark on real CLINC150 windows: false alarms, detections and cost.

The setting is the default scenario's (``refit/scenarios/clinc-shift.yaml``):
the champion knows five domains plus ``oos``, so its reference is 1,000
texts of those drawn from CLINC150's training split, and true intents stand in
for its predicted labels.

* A *quiet* window is other texts of the same domains (validation and test
  splits) with the reference's label mix: each row's label is drawn from the
  training split's label shares, then a text of that label. Drawing texts
  uniformly from validation + test instead would not be quiet: those splits
  hold 23% ``oos`` against 1.3% in training.
* A *shifted* window is a quiet one with ``shift_share`` of its rows
  replaced by texts of the five domains the reference lacks.

Every pair (reference and window) is drawn from its own seed, so a size
measured alone gives the same numbers as in a full run. The confidence
column is random (0.6 to 1.0) on both sides: it is reported by the check but
never changes its verdict.

Evidently's default text drift (``ValueDrift`` on the text column with no
method: a domain classifier's ROC AUC against a bootstrap percentile for a
reference of at most 1,000 rows) runs on the first ``baseline_pairs`` pairs of
each kind, for comparison.

This module sits in ``refit/`` beside the CLI that runs it, but measures
``tasks.drift``: it imports it (and with it Prefect) only inside functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

SCENARIO = "clinc-shift"
REFERENCE_ROWS = 1000
SHIFT_SHARE = 0.3
SEED = 0
QUIET, SHIFTED = 0, 1

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class Pools:
    """The texts windows are drawn from."""

    reference: pd.DataFrame  # reference domains, training split
    quiet: pd.DataFrame      # reference domains, validation and test splits
    shifted: pd.DataFrame    # the other domains, validation and test splits
    label_shares: pd.Series  # label mix of ``reference``, which quiet windows follow
    reference_groups: tuple[str, ...]
    shift_groups: tuple[str, ...]


def load_pools(data_dir: Path, scenario: str = SCENARIO) -> Pools:
    """Split the scenario's data into the reference, quiet and shifted pools."""
    from refit.scenario import load_scenario, load_source

    spec, _ = load_scenario(scenario)
    frame = load_source(spec.source, data_dir)
    home = frame["group"].isin(spec.reference.groups)
    unseen = frame["group"].isin(spec.shift.groups)
    held_out = frame["split"].isin(["val", "test"])
    reference = frame[home & (frame["split"] == "train")].reset_index(drop=True)
    return Pools(
        reference=reference,
        quiet=frame[home & held_out].reset_index(drop=True),
        shifted=frame[unseen & held_out].reset_index(drop=True),
        label_shares=reference["label"].value_counts(normalize=True).sort_index(),
        reference_groups=tuple(spec.reference.groups),
        shift_groups=tuple(spec.shift.groups),
    )


def as_served(rows: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Rows as serving logs them: true intents stand in for predictions, confidence is noise."""
    return pd.DataFrame({
        "text": rows["text"].to_numpy(),
        "predicted_label": rows["label"].to_numpy(),
        "confidence": rng.uniform(0.6, 1.0, len(rows)),
    })


def reference_window(pools: Pools, rng: np.random.Generator, rows: int = REFERENCE_ROWS) -> pd.DataFrame:
    return as_served(pools.reference.iloc[rng.choice(len(pools.reference), rows, replace=False)], rng)


def quiet_rows(pools: Pools, rows: int, rng: np.random.Generator, replace: bool = False) -> pd.DataFrame:
    """``rows`` texts of the reference domains, labels drawn from the reference's label mix.

    Without ``replace`` no text repeats (a label asked for more often than it
    has texts, which CLINC150 does not reach below ~2,000 rows, falls back to
    repeats for that label alone).
    """
    counts = rng.multinomial(rows, pools.label_shares.to_numpy())
    by_label = pools.quiet.groupby("label").indices
    picks = [rng.choice(by_label[label], n, replace=replace or n > len(by_label[label]))
             for label, n in zip(pools.label_shares.index, counts) if n]
    return pools.quiet.iloc[np.concatenate(picks)]


def window(pools: Pools, rows: int, rng: np.random.Generator, shift_share: float = 0.0,
           replace: bool = False) -> pd.DataFrame:
    """A served window of ``rows``, ``shift_share`` of them from the domains the reference lacks."""
    n_shifted = round(shift_share * rows)
    parts = [quiet_rows(pools, rows - n_shifted, rng, replace)]
    if n_shifted:
        parts.append(pools.shifted.iloc[rng.choice(len(pools.shifted), n_shifted,
                                                   replace=replace or n_shifted > len(pools.shifted))])
    rows_ = pd.concat(parts)
    return as_served(rows_.iloc[rng.permutation(len(rows_))], rng)


def pair(pools: Pools, size: int, index: int, kind: int, shift_share: float = SHIFT_SHARE,
         seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference and window of one benchmark pair; the same arguments always give the same pair."""
    rng = np.random.default_rng([seed, size, index, kind])
    reference = reference_window(pools, rng)
    return reference, window(pools, size, rng, shift_share if kind == SHIFTED else 0.0)


def evidently_default_text_drift(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[float, bool, str]:
    """Evidently's own verdict on the text column with its default method: (score, drifted, method)."""
    import warnings

    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    definition = DataDefinition(text_columns=["text"])
    metric = ValueDrift(column="text")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(sklearn|evidently)\..*")
        snapshot = Report([metric], include_tests=True).run(
            Dataset.from_pandas(current[["text"]], data_definition=definition),
            Dataset.from_pandas(reference[["text"]], data_definition=definition))
    result = snapshot.metric_results[metric.metric_id]
    method = result.metric_value_location.metric.params.get("method", "default")
    return float(result.value), any(t.status.value == "FAIL" for t in result.tests), str(method)


def calibrate(pools: Pools, policy, size: int, pairs: int, baseline_pairs: int, shift_share: float = SHIFT_SHARE,
              progress: Progress | None = None) -> dict:
    """False alarms on ``pairs`` quiet pairs and detections on ``pairs`` shifted pairs of ``size`` rows."""
    from tasks.drift import measure_drift

    out: dict = {"size": size, "pairs": pairs, "shift_share": shift_share}
    baseline: dict = {"pairs": min(baseline_pairs, pairs)}
    for kind, name in ((QUIET, "quiet"), (SHIFTED, "shifted")):
        fired, severities, seconds = [], [], []
        by_signal: dict[str, int] = {}
        values: dict[str, list[float]] = {}
        evidently_fired, evidently_scores, evidently_seconds = [], [], []
        for index in range(pairs):
            reference, current = pair(pools, size, index, kind, shift_share)
            start = time.perf_counter()
            result = measure_drift(reference, current, policy)
            seconds.append(time.perf_counter() - start)
            fired.append(result.drift_detected)
            severities.append(result.severity)
            for signal in result.signals.values():
                by_signal[signal.name] = by_signal.get(signal.name, 0) + int(signal.drifted)
                values.setdefault(signal.name, []).append(signal.value)
            if index < baseline_pairs:
                start = time.perf_counter()
                score, drifted, method = evidently_default_text_drift(reference, current)
                evidently_seconds.append(time.perf_counter() - start)
                evidently_fired.append(drifted)
                evidently_scores.append(score)
                baseline["method"] = method
            if progress:
                progress(f"{size} rows, {name}", 1)
        out[name] = {
            "detected": int(sum(fired)),
            "rate": sum(fired) / pairs,
            "severity": {level: severities.count(level) for level in ("none", "low", "high")},
            "signal_fired": by_signal,
            "signal_range": {signal: [round(min(v), 4), round(max(v), 4)] for signal, v in values.items()},
            "seconds_per_check": float(np.mean(seconds)),
        }
        if evidently_fired:
            baseline[name] = {"detected": int(sum(evidently_fired)),
                              "rate": sum(evidently_fired) / len(evidently_fired),
                              "score_range": [round(min(evidently_scores), 4), round(max(evidently_scores), 4)],
                              "seconds_per_check": float(np.mean(evidently_seconds))}
    out["false_alarm_rate"] = out["quiet"]["rate"]
    out["detection_rate"] = out["shifted"]["rate"]
    out["evidently_default"] = baseline
    return out


def scale(pools: Pools, policy, rows_list: list[int], repeats: int = 3, progress: Progress | None = None) -> dict:
    """Time of validating and checking one window of each size in ``rows_list`` against a 1,000-row reference.

    Large windows are quiet windows drawn with replacement (CLINC150 holds
    ~4,900 held-out texts of the reference domains), with request ids and
    timestamps, validated with the request-log schema check. Each size is
    timed ``repeats`` times and the median kept; the first check in a
    process pays for imports, so an untimed check runs first.
    """
    from tasks.drift import measure_drift
    from tasks.validate import split_bad_inference_rows

    rng = np.random.default_rng([SEED, 1])
    reference = reference_window(pools, rng)
    measure_drift(reference, window(pools, 300, rng), policy)
    runs = []
    for rows in rows_list:
        current = window(pools, rows, rng, replace=True)
        current.insert(0, "request_id", [f"r{i}" for i in range(rows)])
        current.insert(1, "timestamp", pd.Timestamp("2026-03-01", tz="UTC") + pd.to_timedelta(np.arange(rows), "s"))
        validate_seconds, drift_seconds = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            kept, _ = split_bad_inference_rows(current)
            validate_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = measure_drift(reference, kept, policy)
            drift_seconds.append(time.perf_counter() - start)
        validate_s, drift_s = float(np.median(validate_seconds)), float(np.median(drift_seconds))
        runs.append({"rows": rows, "rows_sampled": result.rows_sampled, "sample_method": result.sample_method,
                     "repeats": repeats, "validate_seconds": validate_s, "drift_seconds": drift_s,
                     "total_seconds": validate_s + drift_s, "drift_detected": result.drift_detected})
        if progress:
            progress("scale", 1)
    out: dict = {"runs": runs, "max_sample_rows": policy.max_sample_rows}
    if len(runs) >= 2:
        small, large = runs[0], runs[-1]
        out["rows_ratio"] = large["rows"] / small["rows"]
        out["time_ratio"] = large["total_seconds"] / small["total_seconds"]
    return out


def run_benchmark(data_dir: Path, pairs: int, sizes: list[int], scale_rows: list[int], baseline_pairs: int,
                  shift_share: float = SHIFT_SHARE, policy_name: str = "drift",
                  progress: Progress | None = None) -> dict:
    """The whole benchmark as one JSON-ready dict."""
    import os

    from tasks.drift import load_drift_policy

    policy, policy_path = load_drift_policy(policy_name)
    pools = load_pools(data_dir)
    started = time.perf_counter()
    calibration = [calibrate(pools, policy, size, pairs, baseline_pairs, shift_share, progress) for size in sizes]
    return {
        "setup": {
            "data": "CLINC150", "reference_rows": REFERENCE_ROWS, "reference_groups": list(pools.reference_groups),
            "shift_groups": list(pools.shift_groups), "shift_share": shift_share, "seed": SEED,
            "policy": str(policy_path), "max_sample_rows": policy.max_sample_rows, "cpus": os.cpu_count(),
        },
        "calibration": calibration,
        "scale": scale(pools, policy, scale_rows, progress=progress) if scale_rows else None,
        "seconds": time.perf_counter() - started,
    }


def tables(result: dict) -> list:
    """Rich tables of a ``run_benchmark`` result."""
    from rich.table import Table

    setup = result["setup"]
    calibration = Table(title=(
        f"Drift calibration on CLINC150: reference {setup['reference_rows']} texts "
        f"({', '.join(setup['reference_groups'])}), shifted windows "
        f"{setup['shift_share']:.0%} from {', '.join(setup['shift_groups'])}"))
    for column in ("rows", "check", "pairs", "false alarms", "detected", "text / pred. fired", "s/check"):
        calibration.add_column(column, justify="left" if column == "check" else "right")
    methods = set()
    for row in result["calibration"]:
        quiet, shifted = row["quiet"], row["shifted"]
        calibration.add_row(
            str(row["size"]), "refit", str(row["pairs"]),
            f"{quiet['detected']}/{row['pairs']} ({quiet['rate']:.1%})",
            f"{shifted['detected']}/{row['pairs']} ({shifted['rate']:.1%})",
            f"{shifted['signal_fired'].get('text', 0)} / {shifted['signal_fired'].get('prediction', 0)}",
            f"{(quiet['seconds_per_check'] + shifted['seconds_per_check']) / 2:.2f}")
        baseline = row["evidently_default"]
        if "quiet" in baseline:
            n = baseline["pairs"]
            methods.add(baseline.get("method", "?"))
            calibration.add_row(
                "", "Evidently*", str(n),
                f"{baseline['quiet']['detected']}/{n} ({baseline['quiet']['rate']:.1%})",
                f"{baseline['shifted']['detected']}/{n} ({baseline['shifted']['rate']:.1%})", "",
                f"{(baseline['quiet']['seconds_per_check'] + baseline['shifted']['seconds_per_check']) / 2:.2f}")
    if methods:
        calibration.caption = (f"* Evidently's default text drift alone ({', '.join(sorted(methods))}), "
                               "on the first pairs of the same windows")
    out = [calibration] if result["calibration"] else []
    if result.get("scale"):
        scaled = result["scale"]
        table = Table(title=f"Drift check cost by window size (windows sampled to {scaled['max_sample_rows']} rows, "
                            f"{setup['cpus']} CPUs, median of {scaled['runs'][0]['repeats']} runs)")
        for column in ("window rows", "rows measured", "validate s", "drift s", "total s"):
            table.add_column(column, justify="right")
        for run in scaled["runs"]:
            table.add_row(f"{run['rows']:,}", f"{run['rows_sampled']:,}", f"{run['validate_seconds']:.2f}",
                          f"{run['drift_seconds']:.2f}", f"{run['total_seconds']:.2f}")
        if "time_ratio" in scaled:
            table.caption = (f"{scaled['rows_ratio']:.0f}x the rows took {scaled['time_ratio']:.2f}x the time")
        out.append(table)
    return out
