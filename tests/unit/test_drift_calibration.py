"""Thresholds calibrated from the reference: derived from it, kept with it, set by the policy's false-alarm rate.

The text signal's vectors here are synthetic: texts named ``syn-...`` are
given vectors in the encoder's cache (``tasks.drift._embedded``) before the
check, so ``measure_drift`` runs its real code on data whose geometry the
test controls (clusters of "intents" on a sphere) without embedding anything.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import tasks.drift as drift
from refit.store import LocalStore
from tasks.drift import calibration
from tasks.drift import (
    CHAMPION_SIGNALS,
    DriftPolicy,
    KeptCalibrations,
    label_shift_test,
    load_drift_policy,
    measure_drift,
    novelty_null,
)

DIMENSIONS = 48


@pytest.fixture(scope="module")
def policy() -> DriftPolicy:
    return load_drift_policy()[0]


def _text_only(policy: DriftPolicy, **text) -> DriftPolicy:
    return policy.model_copy(update={"text": policy.text.model_copy(update=text)})


class Intents:
    """Texts whose vectors lie in clusters (one per intent) on the unit sphere; ``spread`` sets how tight."""

    def __init__(self, name: str, intents: int, spread: float, seed: int):
        rng = np.random.default_rng(seed)
        self.name, self.spread, self.rng = name, spread, rng
        self.centres = rng.standard_normal((intents, DIMENSIONS))
        self.drawn = 0

    def texts(self, rows: int, intents: range | None = None) -> pd.DataFrame:
        chosen = self.rng.choice(intents or range(len(self.centres)), rows)
        vectors = self.centres[chosen] + self.spread * self.rng.standard_normal((rows, DIMENSIONS))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        texts = [f"syn-{self.name}-{self.drawn + i}" for i in range(rows)]
        self.drawn += rows
        drift._embedded.update(zip(texts, vectors.astype(np.float32)))
        return pd.DataFrame({"text": texts})


def _text(result) -> drift.Signal:
    return result.signals["text"]


def test_the_text_threshold_is_derived_from_the_reference(policy):
    """Two references of different scale: each gets its own threshold, from its own quiet windows."""
    calibrated = _text_only(policy, min_effect=0.0)
    tight, loose = Intents("tight", 30, 0.35, seed=1), Intents("loose", 30, 1.2, seed=1)
    thresholds = {}
    for data in (tight, loose):
        signal = _text(measure_drift(data.texts(600), data.texts(300), calibrated, report=False))
        assert signal.details["calibration"] == "computed"
        assert signal.threshold == pytest.approx(signal.details["threshold_quiet"])
        assert signal.details["pseudo_window_rows"] == 300 and signal.details["pseudo_reference_rows"] == 300
        thresholds[data.name] = signal.threshold
    # the loose reference's neighbours are farther and vary more: its quiet windows spread wider
    assert thresholds["loose"] > 1.3 * thresholds["tight"] > 0, thresholds

    # the shipped policy takes the larger of that and a small effect in the reference's own spread of scores
    signal = _text(measure_drift(loose.texts(600), loose.texts(300), policy, report=False))
    assert signal.threshold == max(signal.details["threshold_quiet"], signal.details["threshold_effect"])
    assert signal.details["threshold_effect"] == pytest.approx(0.2 * signal.details["reference_scores_sd"])


def test_the_calibration_is_kept_beside_the_reference_and_reused(policy, tmp_path, monkeypatch):
    data = Intents("kept", 25, 0.6, seed=2)
    reference, window, small_window = data.texts(500), data.texts(300), data.texts(200)
    reference_path = tmp_path / "reference.parquet"

    first = _text(measure_drift(reference, window, policy, report=False, kept=KeptCalibrations.beside(reference_path)))
    sidecar = tmp_path / "reference.parquet.calibration.json"
    assert first.details["calibration"] == "computed" and sidecar.is_file()

    # a new process (no calibration in memory) reads it back and computes nothing
    monkeypatch.setattr(calibration, "_calibrated", {})
    monkeypatch.setattr(calibration, "novelty_null", lambda *a, **k: pytest.fail("calibrated again"))
    again = _text(measure_drift(reference, window, policy, report=False, kept=KeptCalibrations.beside(reference_path)))
    assert again.details["calibration"] == "kept with the reference"
    assert (again.value, again.threshold) == (first.value, first.threshold)
    written = sidecar.stat().st_mtime_ns

    # another window size is another entry; the first stays
    monkeypatch.undo()
    other = _text(measure_drift(reference, small_window, policy, report=False,
                                kept=KeptCalibrations.beside(reference_path)))
    assert other.details["calibration"] == "computed" and other.details["pseudo_window_rows"] == 200
    assert len(json.loads(sidecar.read_text())["entries"]) == 2 and sidecar.stat().st_mtime_ns != written

    # a damaged file costs a recomputation, never the check
    sidecar.write_text("{not json")
    monkeypatch.setattr(calibration, "_calibrated", {})
    damaged = _text(measure_drift(reference, window, policy, report=False, kept=KeptCalibrations.beside(reference_path)))
    assert damaged.details["calibration"] == "computed" and damaged.threshold == pytest.approx(first.threshold)
    assert len(json.loads(sidecar.read_text())["entries"]) == 1


def test_the_monitor_keeps_the_calibration_under_the_reference_prefix(policy, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    prefix = "reference/model=demo/version=3/"
    data = Intents("store", 25, 0.6, seed=3)
    reference, window = data.texts(500), data.texts(300)

    # what the monitor calls: the Prefect task, with the reference's prefix in the store
    first = _text(drift.check_drift.fn(reference, window, policy, kept=KeptCalibrations.in_store(store, prefix)))
    assert store.exists(prefix + "calibration.json")
    monkeypatch.setattr(calibration, "_calibrated", {})
    again = _text(measure_drift(reference, window, policy, report=False, kept=KeptCalibrations.in_store(store, prefix)))
    assert again.details["calibration"] == "kept with the reference" and again.threshold == first.threshold


def test_a_lower_false_alarm_rate_raises_the_threshold(policy):
    data = Intents("rate", 30, 0.6, seed=4)
    reference, window = data.texts(600), data.texts(300)
    thresholds = [_text(measure_drift(reference, window, _text_only(policy, min_effect=0.0).model_copy(
        update={"false_alarm_rate": rate}), report=False)).threshold for rate in (0.2, 0.05, 0.01, 0.001)]
    assert thresholds == sorted(thresholds) and thresholds[0] < thresholds[-1], thresholds


def test_a_shifted_window_fires_and_quiet_windows_from_the_same_intents_mostly_do_not(policy):
    data = Intents("shift", 40, 0.8, seed=5)
    known, new = range(30), range(30, 40)
    reference = data.texts(800, known)
    quiet = [measure_drift(reference, data.texts(400, known), policy, report=False) for _ in range(25)]
    shifted = [measure_drift(reference, pd.concat([data.texts(280, known), data.texts(120, new)]), policy,
                             report=False) for _ in range(5)]

    assert sum(r.drift_detected for r in quiet) <= 2, [_text(r).value for r in quiet]
    assert all(r.drift_detected and _text(r).drifted for r in shifted), [_text(r).value for r in shifted]
    assert min(_text(r).value for r in shifted) > 2 * _text(shifted[0]).threshold


def test_the_null_is_the_statistic_on_splits_of_the_reference():
    """The fast split (each row's nearest neighbours read from a list) equals the statistic computed whole."""
    rng = np.random.default_rng(6)
    vectors = rng.standard_normal((120, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)

    values = novelty_null(similarity, 40, 5, splits=3, seed=9)

    draw = np.random.default_rng(9)
    for value in values:
        window = np.zeros(120, dtype=bool)
        window[draw.choice(120, 40, replace=False)] = True
        reference, current = vectors[~window], vectors[window]
        own = reference @ reference.T
        np.fill_diagonal(own, -np.inf)
        whole = (np.sort(own, axis=1)[:, -5:].mean(axis=1).mean()
                 - np.sort(current @ reference.T, axis=1)[:, -5:].mean(axis=1).mean())
        assert value == pytest.approx(whole, abs=1e-9)


def test_the_label_shift_threshold_follows_the_labels_and_sizes_not_a_constant():
    rng = np.random.default_rng(7)
    few, many = [f"l{i}" for i in range(5)], [f"l{i}" for i in range(150)]
    reference = pd.Series(rng.choice(many, 1000))
    _, few_labels = label_shift_test(pd.Series(rng.choice(few, 1000)), pd.Series(rng.choice(few, 500)))
    _, large = label_shift_test(reference, pd.Series(rng.choice(many, 1000)))
    _, small = label_shift_test(reference, pd.Series(rng.choice(many, 300)))
    _, strict = label_shift_test(reference, pd.Series(rng.choice(many, 300)), rate=0.001)
    assert small > 1.3 * large > 0 and abs(few_labels - large) > 0.1 * large  # chance moves a small window more
    assert strict > small
    value, threshold = label_shift_test(reference, pd.Series(np.r_[rng.choice(many, 400), ["new"] * 100]))
    assert value > threshold


def test_the_counted_signals_split_the_false_alarm_rate(policy):
    rng = np.random.default_rng(8)
    data = Intents("split", 20, 0.6, seed=8)

    def served(frame: pd.DataFrame, held_out: bool) -> pd.DataFrame:
        out = frame.assign(predicted_label=rng.choice(["a", "b", "c"], len(frame)),
                           confidence=rng.uniform(0.5, 1.0, len(frame)), label="a")
        return out.assign(scored_on="held_out") if held_out else out

    reference, window = data.texts(500), data.texts(300)
    alone = measure_drift(reference, window, policy, report=False)
    held_out = measure_drift(served(reference, True), served(window, False), policy, report=False)
    trained_on = measure_drift(served(reference, False), served(window, False), policy, report=False)

    rate = policy.false_alarm_rate
    assert _text(alone).details["false_alarm_rate"] == rate
    counted = [n for n, s in held_out.signals.items() if s.counts_toward_verdict and "false_alarm_rate" in s.details]
    assert sorted(counted) == ["performance_estimate", "prediction", "text"]
    assert all(held_out.signals[n].details["false_alarm_rate"] == pytest.approx(rate / 3) for n in counted)
    assert _text(trained_on).details["false_alarm_rate"] == pytest.approx(rate / 2)
    for name in CHAMPION_SIGNALS:  # reported ones are calibrated at the whole rate
        signal = held_out.signals[name]
        assert signal.threshold >= signal.details["threshold_effect"] and signal.threshold > 0
    assert held_out.signals["performance_estimate"].threshold >= 0.05


def test_calibrated_needs_a_method_that_can_be_calibrated(policy):
    with pytest.raises(ValueError, match="calibrated"):
        policy.model_validate(policy.model_dump() | {
            "text": policy.text.model_dump() | {"method": "abs_text_content_drift"}})
