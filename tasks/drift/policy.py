"""What a drift check is asked to do and what it answers: the policy, its methods, and the measured signals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from refit.policy import StrictModel, load_policy

Direction = Literal["above", "below"]

NOVELTY = "domain_classifier_novelty"
EMBEDDING_NOVELTY = "embedding_novelty"
LABEL_SHIFT = "label_shift"
NEIGHBOURS = 5
SCORED_ON = "scored_on"  # reference column: "held_out" when its predictions are on rows the champion never saw
HELD_OUT = "held_out"

TEXT_METHODS: dict[str, Direction] = {EMBEDDING_NOVELTY: "above", NOVELTY: "above", "abs_text_content_drift": "above"}
CATEGORICAL_METHODS: dict[str, Direction] = {
    LABEL_SHIFT: "above", "chisquare": "below", "TVD": "below",
    "jensenshannon": "above", "psi": "above", "hellinger": "above",
}
NUMERICAL_METHODS: dict[str, Direction] = {
    "wasserstein": "above", "psi": "above", "jensenshannon": "above", "hellinger": "above", "kl_div": "above",
    "ed": "above", "ks": "below", "anderson": "below", "cramer_von_mises": "below", "mannw": "below",
    "t_test": "below", "es": "below", "empirical_mmd": "below",
}
SIGNAL_METHODS: dict[str, dict[str, Direction]] = {
    "text": TEXT_METHODS, "prediction": CATEGORICAL_METHODS, "confidence": NUMERICAL_METHODS,
}
SEVERITY_SIGNALS = ("text", "prediction")

EMBEDDING_METHODS: dict[str, Direction] = {"mmd": "above", "model": "above", "distance": "above"}
PERFORMANCE_METHODS: dict[str, Direction] = {"accuracy_drop": "above"}
ESTIMATE_METHODS: dict[str, Direction] = {"cbpe": "above", "mean_confidence_drop": "above"}
CONFIDENCE_DROP_METHODS: dict[str, Direction] = {"mean_confidence_drop": "above"}
LOW_CONFIDENCE_METHODS: dict[str, Direction] = {"low_confidence_share": "above"}
DESCRIPTOR_SIGNALS = ("descriptor_length", "descriptor_oov", "descriptor_non_letter")
CHAMPION_SIGNALS = ("confidence_drop", "low_confidence", "performance_estimate")
EXTRA_SIGNAL_METHODS: dict[str, dict[str, Direction]] = {
    "embedding": EMBEDDING_METHODS,
    **{name: NUMERICAL_METHODS for name in DESCRIPTOR_SIGNALS},
    "performance": PERFORMANCE_METHODS,
    "confidence_drop": CONFIDENCE_DROP_METHODS,
    "low_confidence": LOW_CONFIDENCE_METHODS,
    "performance_estimate": ESTIMATE_METHODS,
}
# Computed by refit itself, so a check that uses only these never imports Evidently (4 s on 2 cores).
NATIVE_METHODS = frozenset({EMBEDDING_NOVELTY, NOVELTY, LABEL_SHIFT, "wasserstein"})
# Methods whose threshold can be computed from the reference for each check (``threshold: calibrated``).
CALIBRATED = "calibrated"
CALIBRATED_METHODS = frozenset({EMBEDDING_NOVELTY, LABEL_SHIFT, "mean_confidence_drop", "low_confidence_share",
                                "cbpe"})


class SignalPolicy(StrictModel):
    """One drift signal: whether it runs, how it is measured and where it fires."""

    enabled: bool = Field(description="False skips the signal: it is neither measured nor reported.")
    method: str = Field(description="Evidently stat test name, or one of refit's (see tasks/drift/).")
    threshold: Annotated[float, Field(gt=0)] | Literal["calibrated"] = Field(
        description="Compared with the value on the side the method's direction names; 'calibrated': computed "
                    "from the reference for each check (methods in CALIBRATED_METHODS).")


class TextSignalPolicy(SignalPolicy):
    max_rows: int = Field(default=1000, ge=2, description="embedding_novelty: rows a side embedded (a sample).")
    neighbours: int = Field(default=NEIGHBOURS, ge=1, description="embedding_novelty: nearest reference rows.")
    min_effect: float = Field(default=0.0, ge=0, description=(
        "Calibrated embedding_novelty: the smallest value that fires, in standard deviations of the reference's "
        "own per-text scores (Cohen's d); the threshold is the larger of this and the quiet-window quantile."))


class ExtraSignalPolicy(SignalPolicy):
    """A signal beyond text, prediction and confidence: reported, and in the verdict only when opted in."""

    counts_toward_verdict: bool = Field(
        default=False, description="True: when it fires, severity is at least low. False: reported only.")


class EmbeddingSignalPolicy(ExtraSignalPolicy):
    max_rows: int = Field(default=500, ge=2, description="Rows a side embedded (a sample of the sampled rows).")


class ChampionSignalPolicy(ExtraSignalPolicy):
    """A signal read from the champion's confidences.

    It counts toward the verdict only when ``counts_toward_verdict`` is set
    and the reference's confidences are on rows the champion never trained on
    (its ``scored_on`` column says ``held_out``): confidences on training rows
    run high, so any window would look like a drop.
    """

    min_effect: float = Field(default=0.0, ge=0, description=(
        "Calibrated threshold: the smallest value that fires, in the signal's own unit (a share or probability); "
        "the threshold is the larger of this and the quiet-window quantile."))


class PerformanceSignalPolicy(ExtraSignalPolicy):
    min_labelled: int = Field(default=50, ge=1, description="Fewer labelled rows in the window: not measured.")


def _off(kind: type[ExtraSignalPolicy], method: str, threshold: float):
    return Field(default_factory=lambda: kind(enabled=False, method=method, threshold=threshold))


class DriftPolicy(StrictModel):
    """How a traffic window is compared with the reference, and when it counts as drift."""

    min_window_rows: int = Field(ge=1, description="Fewer usable rows in the window: the check is refused.")
    max_sample_rows: int = Field(ge=2, description="Larger frames are sampled down to this, stratified by label.")
    seed: int = Field(description="Seed of the sampling, so a check can be repeated exactly.")
    text: TextSignalPolicy
    prediction: SignalPolicy
    confidence: SignalPolicy
    embedding: EmbeddingSignalPolicy = _off(EmbeddingSignalPolicy, "mmd", 0.0008)
    descriptor_length: ExtraSignalPolicy = _off(ExtraSignalPolicy, "wasserstein", 0.25)
    descriptor_oov: ExtraSignalPolicy = _off(ExtraSignalPolicy, "wasserstein", 0.25)
    descriptor_non_letter: ExtraSignalPolicy = _off(ExtraSignalPolicy, "wasserstein", 0.25)
    performance: PerformanceSignalPolicy = _off(PerformanceSignalPolicy, "accuracy_drop", 0.05)
    confidence_drop: ChampionSignalPolicy = _off(ChampionSignalPolicy, "mean_confidence_drop", 0.05)
    low_confidence: ChampionSignalPolicy = _off(ChampionSignalPolicy, "low_confidence_share", 0.05)
    performance_estimate: ChampionSignalPolicy = _off(ChampionSignalPolicy, "cbpe", 0.05)
    false_alarm_rate: float = Field(default=0.01, gt=0, lt=0.5, description=(
        "Share of quiet windows (drawn like the reference) a check may flag: calibrated thresholds are set for it, "
        "split evenly among the counted signals that have one."))

    @model_validator(mode="after")
    def _known_methods(self) -> DriftPolicy:
        for name, methods in (SIGNAL_METHODS | EXTRA_SIGNAL_METHODS).items():
            settings = getattr(self, name)
            if settings.method not in methods:
                raise ValueError(f"{name}.method {settings.method!r} is not one of: {', '.join(sorted(methods))}")
            if settings.threshold == CALIBRATED and settings.method not in CALIBRATED_METHODS:
                raise ValueError(f"{name}.threshold: 'calibrated' needs one of the methods "
                                 f"{', '.join(sorted(CALIBRATED_METHODS))}, not {settings.method!r}")
        if self.max_sample_rows < self.min_window_rows:
            raise ValueError(f"max_sample_rows ({self.max_sample_rows}) is below min_window_rows "
                             f"({self.min_window_rows}): no window could be measured whole")
        return self


def load_drift_policy(name_or_path: str | Path = "drift") -> tuple[DriftPolicy, Path]:
    return load_policy(DriftPolicy, name_or_path)


@dataclass(frozen=True)
class Signal:
    """One measured signal.

    ``direction`` says how to read ``value`` against ``threshold``: ``above``
    means drifted when the value is above it (a share or a distance),
    ``below`` when it is below it (a p-value).
    """

    name: str
    value: float
    threshold: float
    drifted: bool
    method: str
    direction: Direction
    counts_toward_verdict: bool = True
    details: dict = field(default_factory=dict)


def fires(value: float, threshold: float, direction: Direction) -> bool:
    """Whether ``value`` is past ``threshold`` on the side ``direction`` names."""
    return bool(value > threshold if direction == "above" else value < threshold)


@dataclass(frozen=True)
class DriftResult:
    """The verdict of one check, with everything needed to explain it."""

    drift_detected: bool
    severity: str
    signals: dict[str, Signal]
    rows_reference: int
    rows_current: int
    rows_sampled: int
    sample_method: str
    report_html: str

    def to_dict(self) -> dict:
        """JSON-ready verdict; the report is left out because it is logged as its own artifact."""
        return {
            "drift_detected": self.drift_detected,
            "severity": self.severity,
            "signals": {name: asdict(signal) for name, signal in self.signals.items()},
            "rows_reference": self.rows_reference,
            "rows_current": self.rows_current,
            "rows_sampled": self.rows_sampled,
            "sample_method": self.sample_method,
        }
