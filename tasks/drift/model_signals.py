"""Signals read from the model rather than the text: embedding drift, delayed-label performance, and the champion's
confidences (their drop, the low-confidence share, and a label-free accuracy estimate after NannyML's CBPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.drift.calibration import normal_quantile
from tasks.drift.policy import (
    CALIBRATED,
    EXTRA_SIGNAL_METHODS,
    HELD_OUT,
    ChampionSignalPolicy,
    DriftPolicy,
    ExtraSignalPolicy,
    PerformanceSignalPolicy,
    Signal,
    fires,
)
from tasks.drift.sampling import Sampled, sample_frame
from tasks.drift.text import embedding_drift

LOW_CONFIDENCE_QUANTILE = 0.10


def classification_quality(frame: pd.DataFrame, label_column: str, prediction_column: str) -> dict[str, float]:
    """Accuracy and macro F1 (over every label seen as truth or prediction) of the predictions against the labels."""
    truth = frame[label_column].astype(str).to_numpy()
    predicted = frame[prediction_column].astype(str).to_numpy()
    labels = np.union1d(truth, predicted)
    hits = np.array([np.sum((truth == label) & (predicted == label)) for label in labels], dtype=float)
    support = np.array([np.sum(truth == label) for label in labels], dtype=float)
    claimed = np.array([np.sum(predicted == label) for label in labels], dtype=float)
    denominator = support + claimed
    f1 = np.divide(2 * hits, denominator, out=np.zeros_like(hits), where=denominator > 0)
    return {"accuracy": float(np.mean(truth == predicted)), "macro_f1": float(f1.mean())}


def _labelled(frame: pd.DataFrame, label_column: str) -> pd.DataFrame:
    labels = frame[label_column]
    return frame[labels.notna() & (labels.astype(str).str.strip() != "")]


def isotonic_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing fit of ``y`` on ``x``, clipped to [0, 1], as sklearn's ``IsotonicRegression`` makes it.

    Returns the distinct ``x`` (values closer than 1e-15 are one, as in
    sklearn) and the fitted value at each; in between, the fit is linear.
    Pool-adjacent-violators on the mean ``y`` of each distinct ``x``,
    weighted by its count. Written out because importing sklearn's took
    1.3 s of a 5 s ``refit drift``; a unit test holds it to sklearn.
    """
    order = np.lexsort((y, x))
    x, y = np.asarray(x, dtype=float)[order], np.asarray(y, dtype=float)[order]
    starts = [0]
    for i in range(1, len(x)):
        if x[i] - x[starts[-1]] >= np.finfo(float).resolution:
            starts.append(i)
    weights = np.diff(np.r_[starts, len(x)]).astype(float)
    means = np.add.reduceat(y, starts) / weights
    blocks: list[list[float]] = []  # [mean, weight, distinct x values in the block]
    for mean, weight in zip(means, weights):
        block = [mean, weight, 1]
        while blocks and blocks[-1][0] >= block[0]:
            last = blocks.pop()
            total = last[1] + block[1]
            block = [(last[0] * last[1] + block[0] * block[1]) / total, total, last[2] + block[2]]
        blocks.append(block)
    fitted = np.repeat([b[0] for b in blocks], [b[2] for b in blocks])
    return x[starts], np.clip(fitted, 0.0, 1.0)


def expected_accuracy(reference_confidence: np.ndarray, reference_correct: np.ndarray,
                      confidence: np.ndarray) -> float:
    """CBPE-style expected accuracy of ``confidence``: each confidence mapped to the reference's hit rate there.

    The map is an isotonic (monotone) fit of the reference's correct-or-not
    against its confidences, so it corrects a champion that is over- or
    under-confident, as long as the reference was scored on rows it never
    trained on. Confidences outside the reference's range take the value at
    its nearest end.
    """
    knots, fitted = isotonic_fit(reference_confidence, reference_correct.astype(float))
    return float(np.interp(np.asarray(confidence, dtype=float), knots, fitted).mean())


def extra_signal(name: str, value: float, settings: ExtraSignalPolicy, counts: bool | None = None,
                 threshold: float | None = None, **details: float | str) -> Signal:
    """A further signal's verdict: the policy's threshold unless a calibrated one is given, details as floats."""
    direction = EXTRA_SIGNAL_METHODS[name][settings.method]
    threshold = float(settings.threshold if threshold is None else threshold)
    return Signal(name=name, value=float(value), threshold=threshold,
                  drifted=fires(value, threshold, direction), method=settings.method, direction=direction,
                  counts_toward_verdict=settings.counts_toward_verdict if counts is None else counts,
                  details={k: v if isinstance(v, str) else float(v) for k, v in details.items()})


def champion_threshold(settings: ChampionSignalPolicy, rate: float | None, spread: float) -> tuple[float | None, dict]:
    """A champion signal's calibrated threshold: the normal ``1 - rate`` quantile of its quiet spread, at least
    ``min_effect``; ``None`` when the policy fixes the threshold.

    Each of these values is a mean (or share) over the window's rows against
    the reference's, so its spread on quiet windows follows from the
    reference's own spread and the two sizes (the central limit theorem);
    nothing is drawn.
    """
    if settings.threshold != CALIBRATED or rate is None:
        return None, {}
    quiet = normal_quantile(rate) * float(spread)
    return max(quiet, settings.min_effect), {"threshold_quiet": quiet, "threshold_effect": settings.min_effect,
                                             "false_alarm_rate": rate, "calibration": "normal quantile"}


@dataclass(frozen=True)
class Confidences:
    """The champion's finite confidences on both sides, and whether the reference's are on rows it never saw."""

    before: np.ndarray  # the reference's
    after: np.ndarray  # the window's
    held_out: bool

    @property
    def sizes(self) -> float:
        """``1/m + 1/n``: the spread of a difference of two means is one row's spread times its square root."""
        return 1 / len(self.after) + 1 / len(self.before)

    @property
    def scored_on(self) -> str:
        return HELD_OUT if self.held_out else "training or unknown"


def model_signals(sampled: Sampled, policy: DriftPolicy, rates: dict[str, float]) -> dict[str, Signal]:
    """Embedding, performance and champion signals, on the already sampled frames."""
    signals: dict[str, Signal] = {}
    if policy.embedding.enabled:
        signals["embedding"] = _embedding_signal(sampled, policy)
    performance = _performance_signal(sampled, policy.performance)
    if performance is not None:
        signals["performance"] = performance
    scores = _confidences(sampled)
    if scores is None:
        return signals
    if policy.confidence_drop.enabled:
        signals["confidence_drop"] = _confidence_drop(scores, policy.confidence_drop, rates.get("confidence_drop"))
    if policy.low_confidence.enabled:
        signals["low_confidence"] = _low_confidence(scores, policy.low_confidence, rates.get("low_confidence"))
    if policy.performance_estimate.enabled:
        signals["performance_estimate"] = _performance_estimate(
            sampled, scores, policy.performance_estimate, rates.get("performance_estimate"))
    return signals


def _embedding_signal(sampled: Sampled, policy: DriftPolicy) -> Signal:
    settings, text_column = policy.embedding, sampled.column_of["text"]
    ref_rows = sample_frame(sampled.ref, settings.max_rows, policy.seed, sampled.stratify_by)[text_column]
    cur_rows = sample_frame(sampled.cur, settings.max_rows, policy.seed, sampled.stratify_by)[text_column]
    value = embedding_drift(ref_rows, cur_rows, settings.method, settings.threshold)
    return extra_signal("embedding", value, settings, rows_reference=len(ref_rows), rows_current=len(cur_rows))


def _performance_signal(sampled: Sampled, settings: PerformanceSignalPolicy) -> Signal | None:
    """Accuracy drop on the window's delayed labels; ``None`` when off or with too few labels."""
    label_column, prediction_column = sampled.label_column, sampled.column_of["prediction"]
    if not settings.enabled or not sampled.wants_labels or label_column is None:
        return None
    ref_labelled, cur_labelled = _labelled(sampled.ref, label_column), _labelled(sampled.cur, label_column)
    if len(cur_labelled) < settings.min_labelled or not len(ref_labelled):
        return None
    before = classification_quality(ref_labelled, label_column, prediction_column)
    after = classification_quality(cur_labelled, label_column, prediction_column)
    return extra_signal(
        "performance", before["accuracy"] - after["accuracy"], settings,
        accuracy_reference=before["accuracy"], accuracy_current=after["accuracy"],
        macro_f1_reference=before["macro_f1"], macro_f1_current=after["macro_f1"],
        macro_f1_drop=before["macro_f1"] - after["macro_f1"], labelled_rows=len(cur_labelled))


def _confidences(sampled: Sampled) -> Confidences | None:
    """Both sides' finite confidences; ``None`` when a side has none (or there is no confidence column)."""
    if not sampled.has["confidence"]:
        return None
    column = sampled.column_of["confidence"]
    before = pd.to_numeric(sampled.ref[column], errors="coerce").to_numpy(dtype=float)
    after = pd.to_numeric(sampled.cur[column], errors="coerce").to_numpy(dtype=float)
    before, after = before[np.isfinite(before)], after[np.isfinite(after)]
    if not len(before) or not len(after):
        return None
    return Confidences(before, after, sampled.held_out)


def _confidence_drop(scores: Confidences, settings: ChampionSignalPolicy, rate: float | None) -> Signal:
    before, after = scores.before, scores.after
    # a difference of two means: its quiet spread is the reference's confidence spread over both sizes
    threshold, why = champion_threshold(settings, rate, before.std() * np.sqrt(scores.sizes))
    return extra_signal(
        "confidence_drop", before.mean() - after.mean(), settings, settings.counts_toward_verdict and scores.held_out,
        threshold, mean_confidence_reference=before.mean(), mean_confidence_current=after.mean(),
        reference_scored_on=scores.scored_on, **why)


def _low_confidence(scores: Confidences, settings: ChampionSignalPolicy, rate: float | None) -> Signal:
    cut = float(np.quantile(scores.before, LOW_CONFIDENCE_QUANTILE))
    share, share_reference = float(np.mean(scores.after < cut)), float(np.mean(scores.before < cut))
    # a difference of two shares: binomial spread at the reference's share
    threshold, why = champion_threshold(settings, rate,
                                        np.sqrt(share_reference * (1 - share_reference) * scores.sizes))
    return extra_signal(
        "low_confidence", share - share_reference, settings, settings.counts_toward_verdict and scores.held_out,
        threshold, cut=cut, share_current=share, share_reference=share_reference, reference_scored_on=scores.scored_on,
        **why)


def _performance_estimate(sampled: Sampled, scores: Confidences, settings: ChampionSignalPolicy,
                          rate: float | None) -> Signal:
    """The reference's accuracy minus the window's expected one: by CBPE where the reference has labels, else
    (or with ``mean_confidence_drop``) mean confidence standing in for accuracy."""
    expected_ref, expected_cur = float(scores.before.mean()), float(scores.after.mean())
    details: dict = {"reference_scored_on": scores.scored_on}
    spread = scores.before.std() * np.sqrt(scores.sizes)
    hits = _reference_hits(sampled)
    if hits is not None:
        correct, reference_confidence = hits
        details["reference_accuracy"] = float(correct.mean())
        details["reference_calibration_gap"] = float(reference_confidence.mean() - correct.mean())
        if settings.method == "cbpe":
            expected_ref, expected_cur, spread = _cbpe(correct, reference_confidence, scores)
    details |= {"estimated_accuracy_reference": expected_ref, "estimated_accuracy_current": expected_cur}
    if settings.method == "cbpe" and hits is None:
        details["note"] = "no labelled reference rows: mean confidence stands in for expected accuracy"
    threshold, why = champion_threshold(settings, rate, spread)
    return extra_signal(
        "performance_estimate", expected_ref - expected_cur, settings,
        settings.counts_toward_verdict and scores.held_out, threshold, **details, **why)


def _reference_hits(sampled: Sampled) -> tuple[np.ndarray, np.ndarray] | None:
    """Whether each labelled reference row was predicted right, and its confidence; ``None`` without such rows."""
    label_column = sampled.label_column
    if label_column is None or not sampled.has["prediction"]:
        return None
    prediction_column, confidence_column = sampled.column_of["prediction"], sampled.column_of["confidence"]
    labelled = _labelled(sampled.ref, label_column)
    labelled = labelled[np.isfinite(pd.to_numeric(labelled[confidence_column], errors="coerce"))]
    if not len(labelled):
        return None
    correct = (labelled[label_column].astype(str) == labelled[prediction_column].astype(str)).to_numpy()
    return correct, labelled[confidence_column].to_numpy(dtype=float)


def _cbpe(correct: np.ndarray, reference_confidence: np.ndarray, scores: Confidences) -> tuple[float, float, float]:
    """CBPE: the reference's measured accuracy, the window's expected one, and the quiet spread of their gap.

    The expectation maps each window confidence to the reference's hit rate
    there (an isotonic fit); the spread is that of the window's mean expected
    hit rate and of the reference's measured one.
    """
    knots, fitted = isotonic_fit(reference_confidence, correct.astype(float))
    expected_cur = float(np.interp(scores.after, knots, fitted).mean())
    spread = np.sqrt(np.interp(scores.before, knots, fitted).var() / len(scores.after)
                     + correct.var() / len(correct))
    return float(correct.mean()), expected_cur, spread
