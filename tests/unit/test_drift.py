"""Drift checks on real CLINC150 text: quiet windows stay quiet, shifted ones fire.

True intents stand in for the model's predicted labels and a uniform random
number for its confidence, so the tests need no model.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refit.errors import RefitError
from tasks.drift import (
    DriftPolicy,
    check_drift,
    label_shift,
    load_drift_policy,
    measure_drift,
    sample_frame,
)

DATA_DIR = Path(__file__).resolve().parents[3] / "shared/data/clinc150"
HOME_DOMAINS = ["banking", "credit_cards", "kitchen_and_dining", "home", "auto_and_commute"]


@cache
def _load_clinc(directory: Path) -> pd.DataFrame:
    """Every CLINC150 row, all splits pooled: text, intent and its domain (``oos`` for out-of-scope)."""
    raw = json.loads((directory / "data_full.json").read_text())
    domain_of = {intent: domain for domain, intents in json.loads((directory / "domains.json").read_text()).items()
                 for intent in intents}
    domain_of["oos"] = "oos"
    rows = [(text, intent, domain_of[intent]) for split in raw.values() for text, intent in split]
    return pd.DataFrame(rows, columns=["text", "intent", "domain"])


@pytest.fixture(scope="module")
def clinc() -> pd.DataFrame:
    if not (DATA_DIR / "data_full.json").is_file():
        pytest.skip(f"CLINC150 not found at {DATA_DIR} (expected data_full.json and domains.json beside the repo)")
    return _load_clinc(DATA_DIR)


@pytest.fixture(scope="module")
def policy() -> DriftPolicy:
    return load_drift_policy()[0]


def _as_served(frame: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame({
        "text": frame["text"].to_numpy(),
        "predicted_label": frame["intent"].to_numpy(),
        "confidence": rng.uniform(0.6, 1.0, len(frame)),
    })


def windows(clinc: pd.DataFrame, seed: int, shifted_share: float = 0.0, focus_domains: tuple[str, ...] = (),
            focus_share: float = 0.0, n_reference: int = 1000,
            n_current: int = 800) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A reference from the five home domains plus oos, and a window of other texts.

    ``shifted_share`` of the window comes from the five other domains and
    ``focus_share`` from ``focus_domains`` alone; the rest is drawn like the
    reference.
    """
    rng = np.random.default_rng(seed)
    home = clinc[clinc["domain"].isin(HOME_DOMAINS + ["oos"])]
    other = clinc[~clinc["domain"].isin(HOME_DOMAINS + ["oos"])]
    reference = home.iloc[rng.choice(len(home), n_reference, replace=False)]
    rest = home.drop(reference.index)
    focus = rest[rest["domain"].isin(focus_domains)]
    focused = focus.iloc[rng.choice(len(focus), round(focus_share * n_current), replace=False)]
    rest = rest.drop(focused.index)
    n_shifted = round(shifted_share * n_current)
    current = pd.concat([
        focused,
        rest.iloc[rng.choice(len(rest), n_current - len(focused) - n_shifted, replace=False)],
        other.iloc[rng.choice(len(other), n_shifted, replace=False)],
    ]).sample(frac=1.0, random_state=seed)
    return _as_served(reference, rng), _as_served(current, rng)


def test_window_from_the_same_domains_is_not_drift(clinc, policy):
    reference, current = windows(clinc, seed=0)

    result = measure_drift(reference, current, policy)

    assert set(result.signals) >= {"text", "prediction", "confidence"}
    assert not any(s.drifted for s in result.signals.values()), result.to_dict()
    assert (result.drift_detected, result.severity) == (False, "none")
    assert (result.rows_reference, result.rows_current, result.rows_sampled) == (1000, 800, 800)
    assert result.sample_method == "all"


def test_forty_percent_from_other_domains_fires_the_text_signal(clinc, policy):
    reference, current = windows(clinc, seed=1, shifted_share=0.4)

    result = measure_drift(reference, current, policy)

    text = result.signals["text"]
    assert text.drifted and text.direction == "above" and text.value > text.threshold, result.to_dict()
    assert result.drift_detected
    assert result.severity == "high"


def test_thirty_percent_from_other_domains_is_detected(clinc, policy):
    reference, current = windows(clinc, seed=2, shifted_share=0.3)

    assert measure_drift(reference, current, policy).drift_detected


def test_prediction_signal_fires_on_a_label_mix_shift(clinc, policy):
    reference, current = windows(clinc, seed=3, focus_domains=("banking", "credit_cards"), focus_share=0.7)

    result = measure_drift(reference, current, policy)

    prediction = result.signals["prediction"]
    assert prediction.drifted and prediction.value > prediction.threshold, result.to_dict()
    assert result.drift_detected


def test_label_shift_is_near_zero_for_chance_and_large_for_new_labels():
    rng = np.random.default_rng(0)
    labels = [f"intent_{i}" for i in range(76)]
    reference = pd.Series(rng.choice(labels, 1000))
    same_mix = pd.Series(rng.choice(labels, 500))
    half_new = pd.concat([pd.Series(rng.choice(labels, 250)), pd.Series(rng.choice(["new_a", "new_b"], 250))])

    assert abs(label_shift(reference, same_mix)) < 0.05
    assert label_shift(reference, half_new) > 0.25


@pytest.mark.parametrize("side", ["reference", "current"])
def test_missing_text_column_raises(clinc, policy, side):
    reference, current = windows(clinc, seed=5)
    frames = {"reference": reference, "current": current}
    frames[side] = frames[side].drop(columns="text")

    with pytest.raises(RefitError, match="has no column 'text'"):
        measure_drift(frames["reference"], frames["current"], policy)


def test_signals_without_their_columns_are_skipped(clinc, policy):
    reference, current = windows(clinc, seed=6)

    result = measure_drift(reference[["text"]], current, policy)

    # only the signals that need nothing but text remain
    assert set(result.signals) == {"text", "embedding", "descriptor_length"}
    off = policy.model_copy(update={"embedding": policy.embedding.model_copy(update={"enabled": False})})
    assert set(measure_drift(reference[["text"]], current, off).signals) == {"text", "descriptor_length"}


def test_window_above_the_sample_limit_is_sampled_by_label(clinc, policy):
    reference, _ = windows(clinc, seed=7)
    home = clinc[clinc["domain"].isin(HOME_DOMAINS + ["oos"])]
    big = _as_served(home.iloc[:3000], np.random.default_rng(7))

    result = measure_drift(reference, big, policy)

    assert (result.rows_current, result.rows_sampled) == (3000, policy.max_sample_rows)
    assert result.sample_method == f"stratified by predicted_label, seed {policy.seed} (current 3000 -> 1000)"
    sample = sample_frame(big, policy.max_sample_rows, policy.seed, "predicted_label")
    expected = big["predicted_label"].value_counts() * policy.max_sample_rows / len(big)
    got = sample["predicted_label"].value_counts().reindex(expected.index, fill_value=0)
    assert len(sample) == policy.max_sample_rows
    assert (got - expected).abs().max() < 1
    assert sample.equals(sample_frame(big, policy.max_sample_rows, policy.seed, "predicted_label"))
    assert not sample.equals(sample_frame(big, policy.max_sample_rows, policy.seed + 1, "predicted_label"))


def test_result_serialises_without_the_report(clinc, policy):
    reference, current = windows(clinc, seed=8, shifted_share=0.4)

    result = check_drift.fn(reference, current, policy)

    verdict = json.loads(json.dumps(result.to_dict()))
    assert "report_html" not in verdict
    assert verdict["signals"]["text"]["direction"] == "above"
    assert "Evidently" in result.report_html and "Domain-classifier novelty share" in result.report_html
    assert check_drift.name == "drift"


def test_shipped_policy_loads():
    policy, path = load_drift_policy()
    assert path.name == "drift.yaml"
    assert policy.min_window_rows <= policy.max_sample_rows


@pytest.mark.parametrize("edit, field", [
    (lambda raw: raw.update(max_rows=5), "max_rows"),
    (lambda raw: raw["text"].update(treshold=0.2), "text.treshold"),
    (lambda raw: raw["prediction"].update(method="ks"), "prediction.method"),
])
def test_policy_file_with_an_unknown_key_or_method_fails(tmp_path, edit, field):
    import yaml

    raw = yaml.safe_load(load_drift_policy()[1].read_text())
    edit(raw)
    path = tmp_path / "drift.yaml"
    path.write_text(yaml.safe_dump(raw))

    with pytest.raises(RefitError, match=field.replace(".", r"\.")):
        load_drift_policy(path)


def _result(severity: str):
    from tasks.drift import DriftResult

    return DriftResult(drift_detected=severity != "none", severity=severity, signals={}, rows_reference=1,
                       rows_current=1, rows_sampled=1, sample_method="all", report_html="")


def test_decide_action_dedupes_cools_down_and_waits_for_labels():
    from registry.tracking import Trigger
    from tasks.drift import decide_action

    earlier = [Trigger("run-a", "s1", "e1", "low", minutes_ago=30.0)]
    assert decide_action(_result("none"), "s2", "e2", 500, 50, earlier, 60)[0] == "none"
    action, why = decide_action(_result("high"), "s1", "e1", 500, 50, [], 60)
    assert action == "update"
    action, why = decide_action(_result("high"), "s1", "e1", 500, 50, earlier, 0)
    assert action == "none" and "run-a" in why                     # same window never twice
    action, why = decide_action(_result("low"), "s2", "e2", 500, 50, earlier, 60)
    assert action == "none" and why.startswith("cooldown")        # same severity inside the cooldown
    assert decide_action(_result("high"), "s2", "e2", 500, 50, earlier, 60)[0] == "update"  # severity rose
    assert decide_action(_result("low"), "s2", "e2", 500, 50, earlier, 20)[0] == "update"   # cooldown over
    action, why = decide_action(_result("low"), "s2", "e2", 10, 50, [], 60)
    assert action == "wait for labels" and "10 labelled" in why


EXTRA_SIGNALS = ("embedding", "descriptor_length", "descriptor_oov", "descriptor_non_letter", "performance",
                 "performance_estimate")


def _enabled(policy: DriftPolicy, *names: str, **changes) -> DriftPolicy:
    return policy.model_copy(update={n: getattr(policy, n).model_copy(update={"enabled": True} | changes)
                                     for n in names})


def _labelled(frame: pd.DataFrame, wrong_share: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """``label`` is the true intent; ``wrong_share`` of predictions are swapped for another row's."""
    out = frame.assign(label=frame["predicted_label"])
    rng = np.random.default_rng(seed)
    wrong = rng.choice(len(out), round(wrong_share * len(out)), replace=False)
    predicted = out["predicted_label"].to_numpy().copy()
    predicted[wrong] = np.roll(predicted[wrong], 1)
    return out.assign(predicted_label=predicted)


def test_shipped_policy_reports_extras_but_they_do_not_count(policy):
    assert {n for n in EXTRA_SIGNALS if getattr(policy, n).enabled} == {
        "embedding", "descriptor_length", "performance", "performance_estimate"}
    assert not any(getattr(policy, n).counts_toward_verdict for n in EXTRA_SIGNALS)


def test_every_extra_signal_is_reported_and_none_changes_a_quiet_verdict(clinc, policy):
    reference, current = windows(clinc, seed=0)

    result = measure_drift(_labelled(reference), _labelled(current), _enabled(policy, *EXTRA_SIGNALS))

    assert set(result.signals) == {"text", "prediction", "confidence", *EXTRA_SIGNALS}
    verdict = json.loads(json.dumps(result.to_dict()))
    for name in EXTRA_SIGNALS:
        signal = verdict["signals"][name]
        assert set(signal) >= {"value", "threshold", "drifted"} and not signal["counts_toward_verdict"]
        assert not signal["drifted"], verdict
    assert (result.drift_detected, result.severity) == (False, "none")
    performance = result.signals["performance"].details
    assert performance["accuracy_reference"] == performance["accuracy_current"] == 1.0
    assert performance["macro_f1_current"] == 1.0
    estimate = result.signals["performance_estimate"].details
    assert 0.6 < estimate["estimated_accuracy_current"] < 1.0
    assert "Drift in descriptor_length" in result.report_html or "descriptor_length" in result.report_html


def test_embedding_signal_is_larger_on_a_shifted_window(clinc, policy):
    only_embedding = _enabled(policy, "embedding")
    quiet = measure_drift(*windows(clinc, seed=0), only_embedding).signals["embedding"]
    shifted = measure_drift(*windows(clinc, seed=1, shifted_share=0.4), only_embedding).signals["embedding"]

    assert shifted.value > 3 * max(quiet.value, 1e-4) and shifted.drifted and not quiet.drifted, (quiet, shifted)
    assert shifted.details["rows_current"] == policy.embedding.max_rows


def test_performance_drift_fires_on_a_large_accuracy_drop_and_needs_enough_labels(clinc, policy):
    reference, current = windows(clinc, seed=4)
    with_performance = _enabled(policy, "performance")

    result = measure_drift(_labelled(reference), _labelled(current, wrong_share=0.3), with_performance)

    signal = result.signals["performance"]
    assert signal.drifted and 0.25 < signal.value < 0.35, signal
    assert signal.details["macro_f1_drop"] > 0.2
    assert result.severity == "none"  # reported only unless the policy opts in
    few = _labelled(current, wrong_share=0.3)
    few.loc[few.index[policy.performance.min_labelled - 1:], "label"] = None
    assert "performance" not in measure_drift(_labelled(reference), few, with_performance).signals
    opted_in = _enabled(policy, "performance", counts_toward_verdict=True)
    result = measure_drift(_labelled(reference), _labelled(current, wrong_share=0.3), opted_in)
    assert (result.drift_detected, result.severity) == (True, "low")


def test_performance_estimate_sees_falling_confidence(clinc, policy):
    reference, current = windows(clinc, seed=4)
    current = current.assign(confidence=current["confidence"] - 0.3)

    signal = measure_drift(reference, current, _enabled(policy, "performance_estimate")).signals["performance_estimate"]

    assert signal.drifted and 0.25 < signal.value < 0.35
    assert signal.details["estimated_accuracy_current"] < 0.6


def test_descriptors_fire_on_very_long_texts(clinc, policy):
    reference, current = windows(clinc, seed=9)
    current = current.assign(text=current["text"] + " " + current["text"] + " " + current["text"] + " 42 !!")
    descriptors = ("descriptor_length", "descriptor_oov", "descriptor_non_letter")

    result = measure_drift(reference, current, _enabled(policy, *descriptors))

    assert result.signals["descriptor_length"].drifted, result.to_dict()
    assert result.signals["descriptor_non_letter"].drifted
