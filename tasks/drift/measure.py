"""One drift check, step by step: sample, measure each signal, calibrate its threshold, decide the severity."""

from __future__ import annotations

from functools import cache

import pandas as pd

from refit.errors import RefitError
from tasks.drift.calibration import KeptCalibrations, false_alarm_rates, text_calibration, text_threshold
from tasks.drift.model_signals import model_signals
from tasks.drift.policy import (
    CALIBRATED,
    EMBEDDING_NOVELTY,
    EXTRA_SIGNAL_METHODS,
    LABEL_SHIFT,
    NATIVE_METHODS,
    NOVELTY,
    SEVERITY_SIGNALS,
    SIGNAL_METHODS,
    DriftPolicy,
    DriftResult,
    Signal,
    SignalPolicy,
    TextSignalPolicy,
    fires,
)
from tasks.drift.prediction import LABEL_SHIFT_DRAWS, label_shift_test, normed_wasserstein
from tasks.drift.report import _evidently_report
from tasks.drift.sampling import Sampled, sample_for_check, sample_frame
from tasks.drift.text import _novelty, novelty_share


def measure_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    policy: DriftPolicy,
    *,
    text_column: str = "text",
    prediction_column: str = "predicted_label",
    confidence_column: str = "confidence",
    label_column: str = "label",
    report: bool = True,
    kept: KeptCalibrations | None = None,
) -> DriftResult:
    """Compare ``current`` with ``reference`` under ``policy``.

    Prediction and confidence signals run only when both frames carry their
    column, so a reference without model outputs still gets a text check.
    Frames above ``policy.max_sample_rows`` are sampled (stratified by the
    prediction column when there is one) to bound the cost and keep the
    thresholds in the range they were calibrated for; the text signal embeds
    at most ``policy.text.max_rows`` of those a side. The window-size floor
    (``policy.min_window_rows``) is the caller's to enforce.

    Severity is ``high`` when the text and prediction signals both fire (the
    content and the model's answers moved: a real shift, not noise in one
    view), ``low`` when one of them fires and ``none`` otherwise; drift is
    detected unless it is ``none``. Confidence is reported only. The further
    signals run when enabled in the policy and their inputs are there
    (performance: a ``label_column`` on both sides with at least
    ``performance.min_labelled`` labels in the window; the champion signals:
    confidences on both sides); a fired one raises severity from ``none`` to
    ``low`` only when its policy sets ``counts_toward_verdict``, and a
    champion signal only when the reference's ``scored_on`` column says
    ``held_out`` as well.

    A signal whose policy says ``threshold: calibrated`` gets its threshold
    from the reference for this check (``CALIBRATED_METHODS``): the quantile
    of its values on quiet windows like the reference, at the counted
    signals' share of ``policy.false_alarm_rate``, and at least the signal's
    ``min_effect``. The text signal's quiet windows are drawn from the
    reference's own embeddings, once per reference and window size: kept in
    this process and, with ``kept``, with the reference (a file beside it,
    or its prefix in the object store), so a new process reads them back.

    Refit computes its own methods (``NATIVE_METHODS``, the shipped policy's);
    Evidently is imported only for other methods or for the HTML report
    (``report``; without it ``report_html`` is empty).

    Raises:
        RefitError: a frame has no text column.
    """
    for side, frame in (("reference", reference), ("current window", current)):
        if text_column not in frame.columns:
            raise RefitError(f"{side} has no column {text_column!r} (columns: {', '.join(map(str, frame.columns))})")
    sampled = sample_for_check(reference, current, policy, text_column=text_column,
                               prediction_column=prediction_column, confidence_column=confidence_column,
                               label_column=label_column)
    rates = false_alarm_rates(policy, sampled.measured, sampled.has, sampled.held_out)
    values, thresholds, details = _native_values(sampled, policy, rates, kept)
    report_html = ""
    if report or len(values) < len(sampled.names):
        values, report_html = _with_evidently(sampled, policy, values, thresholds)
        if not report:
            report_html = ""
    signals = _column_signals(sampled, policy, values, thresholds, details)
    signals |= model_signals(sampled, policy, rates)
    if kept is not None:
        kept.save()
    severity = _severity(signals)
    return DriftResult(
        drift_detected=severity != "none",
        severity=severity,
        signals=signals,
        rows_reference=len(reference),
        rows_current=len(current),
        rows_sampled=len(sampled.cur),
        sample_method=sampled.sample_method,
        report_html=report_html,
    )


def _native_values(sampled: Sampled, policy: DriftPolicy, rates: dict[str, float],
                   kept: KeptCalibrations | None) -> tuple[dict[str, float], dict[str, float], dict[str, dict]]:
    """The values refit computes itself, every threshold known so far (fixed or calibrated), and their details."""
    values: dict[str, float] = {}
    thresholds: dict[str, float] = {name: getattr(policy, name).threshold for name in sampled.names
                                    if getattr(policy, name).threshold != CALIBRATED}
    details: dict[str, dict] = {}
    for name in sampled.names:
        settings = getattr(policy, name)
        if settings.method in NATIVE_METHODS:
            values[name], threshold, details[name] = _native_value(
                name, settings, sampled, policy.seed, rates.get(name), kept)
            if threshold is not None:
                thresholds[name] = threshold
    return values, thresholds, details


def _native_value(name: str, settings: SignalPolicy, sampled: Sampled, seed: int, rate: float | None,
                  kept: KeptCalibrations | None) -> tuple[float, float | None, dict]:
    """A signal's value by refit's own code (the methods in ``NATIVE_METHODS``), its calibrated threshold
    (``None`` when the policy fixes it) and what explains them."""
    method, column = settings.method, sampled.column_of[name]
    ref, cur = sampled.ref[column], sampled.cur[column]
    if method == EMBEDDING_NOVELTY:
        return _embedding_novelty(settings, sampled, seed, rate, kept)
    if method == NOVELTY:
        return novelty_share(ref, cur), None, {}
    if method == LABEL_SHIFT:
        value, threshold = label_shift_test(ref, cur, rate or 0.01)
        if settings.threshold != CALIBRATED:
            return value, None, {}
        return value, threshold, {"calibration": "permutation test", "false_alarm_rate": rate,
                                  "permutations": LABEL_SHIFT_DRAWS}
    if method == "wasserstein":
        return normed_wasserstein(ref, cur), None, {}
    raise ValueError(f"{method} is not computed by refit")


def _embedding_novelty(settings: TextSignalPolicy, sampled: Sampled, seed: int, rate: float | None,
                       kept: KeptCalibrations | None) -> tuple[float, float | None, dict]:
    """The text signal on at most ``settings.max_rows`` a side, and its threshold calibrated from the reference."""
    column = sampled.column_of["text"]
    ref_rows = sample_frame(sampled.ref, settings.max_rows, seed, sampled.stratify_by)[column]
    cur_rows = sample_frame(sampled.cur, settings.max_rows, seed, sampled.stratify_by)[column]
    value, details, parts = _novelty(ref_rows, cur_rows, settings.neighbours)
    if settings.threshold != CALIBRATED:
        return value, None, details
    entry, source = text_calibration(list(ref_rows.astype(str)), parts, seed, kept)
    threshold, why = text_threshold(entry["null_mean"], entry["null_sd"], float(parts.reference_scores.std()),
                                    rate, settings.min_effect)
    return value, threshold, details | why | {
        "calibration": source, "calibration_splits": entry["splits"],
        "pseudo_window_rows": entry["pseudo_window_rows"],
        "pseudo_reference_rows": entry["pseudo_reference_rows"]}


def _with_evidently(sampled: Sampled, policy: DriftPolicy, values: dict[str, float],
                    thresholds: dict[str, float]) -> tuple[dict[str, float], str]:
    """``values`` completed by Evidently's (refit's own kept where it has one), and Evidently's HTML report."""
    names = sampled.names
    measured_by_evidently, report_html = _evidently_report(
        sampled.ref, sampled.cur, thresholds, policy, {name: sampled.column_of[name] for name in names},
        sampled.measured, sampled.descriptors, sampled.column_of["text"], sampled.column_of["prediction"],
        sampled.column_of["confidence"])
    return {**values, **{name: measured_by_evidently[name] for name in names if name not in values}}, report_html


def _column_signals(sampled: Sampled, policy: DriftPolicy, values: dict[str, float], thresholds: dict[str, float],
                    details: dict[str, dict]) -> dict[str, Signal]:
    """The text, prediction, confidence and descriptor signals' verdicts."""
    signals = {}
    for name in sampled.names:
        settings = getattr(policy, name)
        direction = (SIGNAL_METHODS | EXTRA_SIGNAL_METHODS)[name][settings.method]
        signals[name] = Signal(
            name=name, value=float(values[name]), threshold=float(thresholds[name]),
            drifted=fires(values[name], thresholds[name], direction), method=settings.method, direction=direction,
            counts_toward_verdict=name in SEVERITY_SIGNALS or getattr(settings, "counts_toward_verdict", False),
            details=details.get(name, {}))
    return signals


def _severity(signals: dict[str, Signal]) -> str:
    """The rule in ``measure_drift``'s docstring; a disabled or absent signal counts as not fired."""
    fired = [name for name in SEVERITY_SIGNALS if name in signals and signals[name].drifted]
    if len(fired) == len(SEVERITY_SIGNALS):
        return "high"
    opted_in = any(s.drifted and s.counts_toward_verdict for name, s in signals.items()
                   if name in EXTRA_SIGNAL_METHODS)
    return "low" if fired or opted_in else "none"


def _check_drift(reference: pd.DataFrame, current: pd.DataFrame, policy: DriftPolicy,
                 kept: KeptCalibrations | None = None, **columns: str) -> DriftResult:
    """Prefect task around ``measure_drift``; ``columns`` passes the column names through.

    The monitor passes ``kept=KeptCalibrations.in_store(store, reference_prefix(model, champion))`` so the
    text threshold's calibration is computed once per champion and window size, and read back by later checks.
    """
    return measure_drift(reference, current, policy, kept=kept, **columns)


@cache
def _drift_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(name="drift", cache_policy=NO_CACHE)(_check_drift)
