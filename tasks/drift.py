"""Drift: is a traffic window different enough from the reference to act on?

Three signals compare the window with the champion's reference snapshot, each
an Evidently ``ValueDrift`` metric, so the HTML report shows its evidence:

* ``text``, what users write. ``domain_classifier_novelty`` trains a TF-IDF +
  logistic-regression domain classifier (reference vs current, 5-fold
  out-of-fold scores) and reports the share of current rows it scores above
  the reference's 95th percentile, minus the 5% chance gives: roughly the
  share of traffic unlike the reference. Evidently's ``abs_text_content_drift``
  (ROC AUC of its own classifier) can be chosen instead but is not the
  default: AUC weighs every difference alike, and it read 0.55 both on
  windows with 30% new topics and on quiet windows drawn from CLINC150's
  validation split against a training-split reference (phrasing and the
  out-of-scope share differ between splits), so no threshold separates them.
  Counting only the classifier's upper tail does: new topics pile up there,
  diffuse differences do not.
* ``prediction``, the predicted-label mix. ``label_shift`` is the total
  variation distance between the label distributions minus its mean under
  the permutation null: ~0 when windows differ by chance, although the raw
  distance (like Evidently's Jensen-Shannon distance, ~0.17) is far from 0
  with ~150 sparse labels.
* ``confidence``, Evidently's normed Wasserstein distance. Reported, but it
  never changes severity: the reference confidences are the champion's scores
  on its own training rows, which sit above its scores on unseen traffic.

Further signals are reported beside them (value, threshold, drifted) but
change severity only where the policy sets ``counts_toward_verdict``:

* ``embedding``, what texts mean. Mean-pooled all-MiniLM-L6-v2 sentence
  embeddings of the base model (no LoRA) of up to ``embedding.max_rows``
  sampled rows a side, compared with Evidently's embedding drift method
  (``MMDDriftMethod``, ``ModelDriftMethod`` or ``DistanceDriftMethod``, the
  methods behind ``EmbeddingsDrift``) called directly on the two embedding
  frames. The ``EmbeddingsDrift`` metric itself is not used: in Evidently
  0.7.23 it always fits a t-SNE of up to 2 x 5,000 rows for its plot, 20-40 s
  on 2 cores, whatever the method. MMD (the default) read 0.0000-0.0002 on
  20 quiet benchmark pairs of 500 rows and 0.0015-0.0029 on 20 pairs with
  30% from unseen domains.
* ``descriptor_length``, ``descriptor_oov``, ``descriptor_non_letter``: text
  length in characters, the share of words that are not whole words of the
  base tokenizer's ``vocab.txt``, and the share of non-space characters that
  are not letters; each an Evidently ``ValueDrift`` (normed Wasserstein by
  default) on its descriptor column, in the same HTML report.
* ``performance``, accuracy drop against the reference when the window has
  delayed labels (at least ``performance.min_labelled``): accuracy and macro
  F1 of the predictions against the labels from Evidently's ``Accuracy`` and
  ``F1Score`` metrics on each side; the value is reference accuracy minus
  current accuracy.
* ``performance_estimate``, a label-free estimate in the spirit of NannyML's
  CBPE: with calibrated confidences the expected accuracy is the mean
  confidence, so the value is the mean confidence on the reference minus that
  on the window. The reference's calibration gap (mean confidence minus
  accuracy) is reported with it when the reference has labels.

The thresholds in ``refit/policies/drift.yaml`` were measured on CLINC150 with
a reference of 1,000 rows from five domains plus ``oos`` and true intents
standing in for predictions; the numbers are in that file.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, model_validator

from refit.errors import RefitError
from refit.policy import StrictModel, load_policy

if TYPE_CHECKING:
    from registry.tracking import Trigger

Direction = Literal["above", "below"]

NOVELTY = "domain_classifier_novelty"
LABEL_SHIFT = "label_shift"
NOVELTY_QUANTILE = 0.95
NOVELTY_FOLDS = 5
LABEL_SHIFT_DRAWS = 2_000

TEXT_METHODS: dict[str, Direction] = {NOVELTY: "above", "abs_text_content_drift": "above"}
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
ESTIMATE_METHODS: dict[str, Direction] = {"mean_confidence_drop": "above"}
DESCRIPTOR_SIGNALS = ("descriptor_length", "descriptor_oov", "descriptor_non_letter")
EXTRA_SIGNAL_METHODS: dict[str, dict[str, Direction]] = {
    "embedding": EMBEDDING_METHODS,
    **{name: NUMERICAL_METHODS for name in DESCRIPTOR_SIGNALS},
    "performance": PERFORMANCE_METHODS,
    "performance_estimate": ESTIMATE_METHODS,
}
EMBEDDING_MAX_LENGTH = 64
EMBEDDING_BATCH = 128
WORD = re.compile(r"[^\W\d_]+")


class SignalPolicy(StrictModel):
    """One drift signal: whether it runs, how it is measured and where it fires."""

    enabled: bool = Field(description="False skips the signal: it is neither measured nor reported.")
    method: str = Field(description="Evidently stat test name, or one of refit's (see tasks/drift.py).")
    threshold: float = Field(gt=0, description="Compared with the value on the side the method's direction names.")


class ExtraSignalPolicy(SignalPolicy):
    """A signal beyond text, prediction and confidence: reported, and in the verdict only when opted in."""

    counts_toward_verdict: bool = Field(
        default=False, description="True: when it fires, severity is at least low. False: reported only.")


class EmbeddingSignalPolicy(ExtraSignalPolicy):
    max_rows: int = Field(default=500, ge=2, description="Rows a side embedded (a sample of the sampled rows).")


class PerformanceSignalPolicy(ExtraSignalPolicy):
    min_labelled: int = Field(default=50, ge=1, description="Fewer labelled rows in the window: not measured.")


def _off(kind: type[ExtraSignalPolicy], method: str, threshold: float):
    return Field(default_factory=lambda: kind(enabled=False, method=method, threshold=threshold))


class DriftPolicy(StrictModel):
    """How a traffic window is compared with the reference, and when it counts as drift."""

    min_window_rows: int = Field(ge=1, description="Fewer usable rows in the window: the check is refused.")
    max_sample_rows: int = Field(ge=2, description="Larger frames are sampled down to this, stratified by label.")
    seed: int = Field(description="Seed of the sampling, so a check can be repeated exactly.")
    text: SignalPolicy
    prediction: SignalPolicy
    confidence: SignalPolicy
    embedding: EmbeddingSignalPolicy = _off(EmbeddingSignalPolicy, "mmd", 0.0008)
    descriptor_length: ExtraSignalPolicy = _off(ExtraSignalPolicy, "wasserstein", 0.25)
    descriptor_oov: ExtraSignalPolicy = _off(ExtraSignalPolicy, "wasserstein", 0.25)
    descriptor_non_letter: ExtraSignalPolicy = _off(ExtraSignalPolicy, "wasserstein", 0.25)
    performance: PerformanceSignalPolicy = _off(PerformanceSignalPolicy, "accuracy_drop", 0.05)
    performance_estimate: ExtraSignalPolicy = _off(ExtraSignalPolicy, "mean_confidence_drop", 0.05)
    cooldown_minutes: float = Field(ge=0, description="No second update within this time unless severity rises.")

    @model_validator(mode="after")
    def _known_methods(self) -> DriftPolicy:
        for name, methods in (SIGNAL_METHODS | EXTRA_SIGNAL_METHODS).items():
            method = getattr(self, name).method
            if method not in methods:
                raise ValueError(f"{name}.method {method!r} is not one of: {', '.join(sorted(methods))}")
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


def novelty_share(reference: pd.Series, current: pd.Series, seed: int = 0) -> float:
    """Share of current texts a domain classifier finds unlike the reference, beyond chance.

    Out-of-fold scores keep every row unseen by the model that scores it, so
    under no drift current and reference scores are exchangeable and about
    5% of current rows clear the reference's 95th percentile. Counting only
    that upper tail makes the value grow with new content (topics the
    reference lacks) and move much less with diffuse differences such as
    phrasing or the reference's own rarer content going quiet.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    folds = min(NOVELTY_FOLDS, len(reference), len(current))
    if folds < 2:
        raise RefitError(f"text drift needs at least 2 rows on each side, got {len(reference)} and {len(current)}")
    texts = pd.concat([reference, current], ignore_index=True).astype(str)
    is_current = np.r_[np.zeros(len(reference), dtype=int), np.ones(len(current), dtype=int)]
    classifier = make_pipeline(TfidfVectorizer(sublinear_tf=True), LogisticRegression(max_iter=1000))
    scores = cross_val_predict(classifier, texts, is_current, method="predict_proba",
                               cv=StratifiedKFold(folds, shuffle=True, random_state=seed))[:, 1]
    cut = np.quantile(scores[is_current == 0], NOVELTY_QUANTILE)
    return float(np.mean(scores[is_current == 1] > cut) - (1 - NOVELTY_QUANTILE))


def label_shift(reference: pd.Series, current: pd.Series, draws: int = LABEL_SHIFT_DRAWS, seed: int = 0) -> float:
    """How far the label mix moved, beyond what sampling noise alone moves it.

    The total variation distance between the two label distributions (the
    share of traffic that would have to change label to match) is biased
    upward when labels are many and sparse: ~0.19 between two samples of the
    same 76-label mix of 1,000 and 500 rows. Subtracting its mean under the
    exact permutation null (the pooled counts redistributed at random between
    the frames, multivariate hypergeometric draws) leaves ~0 for windows that
    only differ by chance and keeps concentrated moves: new labels, a surge
    of ``oos``, a few intents taking over. Moves spread thinly over many
    rare labels stay inside the noise, which is what keeps a reference that
    holds a few examples of many extra labels from alarming on every window.
    """
    ref_counts = reference.astype(str).value_counts()
    cur_counts = current.astype(str).value_counts()
    labels = ref_counts.index.union(cur_counts.index)
    observed = cur_counts.reindex(labels, fill_value=0).to_numpy()
    totals = ref_counts.reindex(labels, fill_value=0).to_numpy() + observed
    n_current, n_reference = int(observed.sum()), int(totals.sum() - observed.sum())

    def distance(current_counts: np.ndarray) -> np.ndarray:
        gap = current_counts / n_current - (totals - current_counts) / n_reference
        return np.clip(gap, 0, None).sum(axis=-1)

    null = np.random.default_rng(seed).multivariate_hypergeometric(totals, n_current, size=draws)
    return float(distance(observed) - distance(null).mean())


def _novelty_stattest(reference: pd.Series, current: pd.Series, feature_type, threshold: float) -> tuple[float, bool]:
    share = novelty_share(reference, current)
    return share, share > threshold


def _label_shift_stattest(reference: pd.Series, current: pd.Series, feature_type,
                          threshold: float) -> tuple[float, bool]:
    shift = label_shift(reference, current)
    return shift, shift > threshold


@cache
def _register_stattests() -> None:
    """Make refit's methods known to Evidently by name, so ValueDrift runs and renders them."""
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    register_stattest(StatTest(name=NOVELTY, display_name="Domain-classifier novelty share (refit)",
                               allowed_feature_types=[ColumnType.Text], default_threshold=0.1),
                      _novelty_stattest)
    register_stattest(StatTest(name=LABEL_SHIFT, display_name="Label shift beyond chance (refit)",
                               allowed_feature_types=[ColumnType.Categorical], default_threshold=0.08),
                      _label_shift_stattest)


def _allocate(counts: np.ndarray, limit: int) -> np.ndarray:
    """Largest-remainder split of ``limit`` rows across strata, proportional to their sizes."""
    quota = counts * limit / counts.sum()
    take = np.floor(quota).astype(int)
    by_remainder = np.lexsort((np.arange(len(counts)), -(quota - take)))
    take[by_remainder[: limit - take.sum()]] += 1
    return take


def sample_frame(frame: pd.DataFrame, limit: int, seed: int, stratify_by: str | None = None) -> pd.DataFrame:
    """At most ``limit`` rows, keeping each label's share so the label signal is not distorted by sampling."""
    if len(frame) <= limit:
        return frame
    rng = np.random.default_rng(seed)
    if stratify_by is None:
        picks = rng.choice(len(frame), size=limit, replace=False)
    else:
        _, stratum, counts = np.unique(frame[stratify_by].astype(str).to_numpy(), return_inverse=True,
                                       return_counts=True)
        take = _allocate(counts, limit)
        picks = np.concatenate([rng.choice(np.flatnonzero(stratum == i), size=n, replace=False)
                                for i, n in enumerate(take) if n])
    return frame.iloc[np.sort(picks)].reset_index(drop=True)


def _severity(signals: dict[str, Signal]) -> str:
    """The rule in ``measure_drift``'s docstring; a disabled or absent signal counts as not fired."""
    fired = [name for name in SEVERITY_SIGNALS if name in signals and signals[name].drifted]
    if len(fired) == len(SEVERITY_SIGNALS):
        return "high"
    opted_in = any(s.drifted and s.counts_toward_verdict for name, s in signals.items()
                   if name in EXTRA_SIGNAL_METHODS)
    return "low" if fired or opted_in else "none"


@cache
def _base_encoder():
    """The packaged all-MiniLM-L6-v2 (no adapter, no head) and its tokenizer, loaded once per process."""
    from transformers import AutoModel, AutoTokenizer

    from refit.modeling import _quiet, base_model_path

    _quiet()
    path = base_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@cache
def _base_vocabulary() -> frozenset[str]:
    """Whole words of the base tokenizer's ``vocab.txt`` (word pieces ``##..`` and ``[..]`` tokens left out)."""
    from refit.modeling import base_model_path

    lines = (base_model_path() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return frozenset(w for w in lines if w and not w.startswith("##") and not w.startswith("["))


def sentence_embeddings(texts: list[str] | tuple[str, ...]) -> np.ndarray:
    """Mean-pooled, L2-normalised base-model embeddings, batched by length (max 64 tokens)."""
    import torch

    tokenizer, model = _base_encoder()
    input_ids = tokenizer(list(texts), truncation=True, max_length=EMBEDDING_MAX_LENGTH)["input_ids"]
    order = np.argsort([len(ids) for ids in input_ids], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), EMBEDDING_BATCH):
            batch = order[start:start + EMBEDDING_BATCH]
            features = tokenizer.pad({"input_ids": [input_ids[i] for i in batch]}, return_tensors="pt")
            hidden = model(**features).last_hidden_state
            mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[batch] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


@lru_cache(maxsize=4)
def _reference_embeddings(texts: tuple[str, ...]) -> np.ndarray:
    """The reference changes only with the champion: its embeddings are kept for the next checks."""
    return sentence_embeddings(texts)


def embedding_drift(reference: pd.Series, current: pd.Series, method: str, threshold: float) -> float:
    """Evidently's embedding drift method (the one behind ``EmbeddingsDrift``) on base-model embeddings."""
    from evidently.metrics.embeddings import DistanceDriftMethod, MMDDriftMethod, ModelDriftMethod

    drift_method = {"mmd": MMDDriftMethod, "model": ModelDriftMethod,
                    "distance": DistanceDriftMethod}[method](threshold=threshold)
    ref = _reference_embeddings(tuple(reference.astype(str)))
    cur = sentence_embeddings(list(current.astype(str)))
    columns = [f"e{i}" for i in range(ref.shape[1])]
    value, _, _ = drift_method(pd.DataFrame(cur, columns=columns), pd.DataFrame(ref, columns=columns))
    return float(value)


def text_descriptors(texts: pd.Series) -> pd.DataFrame:
    """Per-text length (characters), out-of-vocabulary word share and non-letter share of non-space characters."""
    vocabulary = _base_vocabulary()
    texts = texts.astype(str)
    words = texts.str.lower().map(WORD.findall)
    oov = words.map(lambda ws: sum(w not in vocabulary for w in ws) / len(ws) if ws else 0.0)
    visible = texts.str.count(r"\S")
    letters = texts.str.count(r"[^\W\d_]")
    return pd.DataFrame({
        "descriptor_length": texts.str.len().astype(float),
        "descriptor_oov": oov.astype(float),
        "descriptor_non_letter": ((visible - letters) / visible.where(visible > 0, 1)).astype(float),
    })


def classification_quality(frame: pd.DataFrame, label_column: str, prediction_column: str) -> dict[str, float]:
    """Accuracy and macro F1 of the predictions against the labels, from Evidently's classification metrics."""
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.metrics import Accuracy, F1Score

    rows = pd.DataFrame({"target": frame[label_column].astype(str), "prediction": frame[prediction_column].astype(str)})
    definition = DataDefinition(categorical_columns=["target", "prediction"], classification=[
        MulticlassClassification(target="target", prediction_labels="prediction")])
    accuracy, f1 = Accuracy(), F1Score(conf_matrix=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(sklearn|evidently)\..*")
        snapshot = Report([accuracy, f1]).run(Dataset.from_pandas(rows, data_definition=definition), None)
    return {"accuracy": float(snapshot.metric_results[accuracy.metric_id].value),
            "macro_f1": float(snapshot.metric_results[f1.metric_id].value)}


def _labelled(frame: pd.DataFrame, label_column: str) -> pd.DataFrame:
    labels = frame[label_column]
    return frame[labels.notna() & (labels.astype(str).str.strip() != "")]


def measure_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    policy: DriftPolicy,
    *,
    text_column: str = "text",
    prediction_column: str = "predicted_label",
    confidence_column: str = "confidence",
    label_column: str = "label",
) -> DriftResult:
    """Compare ``current`` with ``reference`` under ``policy``.

    Prediction and confidence signals run only when both frames carry their
    column, so a reference without model outputs still gets a text check.
    Frames above ``policy.max_sample_rows`` are sampled (stratified by the
    prediction column when there is one) to bound the cost and keep the
    thresholds in the range they were calibrated for. The window-size floor
    (``policy.min_window_rows``) is the caller's to enforce.

    Severity is ``high`` when the text and prediction signals both fire (the
    content and the model's answers moved: a real shift, not noise in one
    view), ``low`` when one of them fires and ``none`` otherwise; drift is
    detected unless it is ``none``. Confidence is reported only (see the
    module docstring). The further signals (embedding, descriptors,
    performance, performance estimate) run when enabled in the policy and
    their inputs are there (performance: a ``label_column`` on both sides with
    at least ``performance.min_labelled`` labels in the window); a fired one
    raises severity from ``none`` to ``low`` only when its policy sets
    ``counts_toward_verdict``.

    Raises:
        RefitError: a frame has no text column.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    for side, frame in (("reference", reference), ("current window", current)):
        if text_column not in frame.columns:
            raise RefitError(f"{side} has no column {text_column!r} (columns: {', '.join(map(str, frame.columns))})")
    has = {
        "text": True,
        "prediction": prediction_column in reference.columns and prediction_column in current.columns,
        "confidence": confidence_column in reference.columns and confidence_column in current.columns,
    }
    column_of = {"text": text_column, "prediction": prediction_column, "confidence": confidence_column}
    measured = [name for name in SIGNAL_METHODS if has[name] and getattr(policy, name).enabled]
    stratify_by = prediction_column if has["prediction"] else None
    columns = [column_of[name] for name in SIGNAL_METHODS if has[name]]
    wants_labels = (policy.performance.enabled and has["prediction"] and label_column in reference.columns
                    and label_column in current.columns and label_column not in columns)
    if wants_labels:
        columns.append(label_column)
    ref = sample_frame(_measured_columns(reference, columns, stratify_by), policy.max_sample_rows, policy.seed,
                       stratify_by)
    cur = sample_frame(_measured_columns(current, columns, stratify_by), policy.max_sample_rows, policy.seed,
                       stratify_by)
    sample_method = _describe_sampling(reference, current, ref, cur, stratify_by, policy.seed)

    _register_stattests()
    metrics = {name: ValueDrift(column=column_of[name], method=getattr(policy, name).method,
                                threshold=getattr(policy, name).threshold) for name in measured}
    definition = DataDefinition(
        text_columns=[text_column],
        categorical_columns=[prediction_column] if "prediction" in measured else [],
        numerical_columns=[confidence_column] if "confidence" in measured else [],
    )
    descriptors = [name for name in DESCRIPTOR_SIGNALS if getattr(policy, name).enabled]
    if descriptors:
        ref = pd.concat([ref, text_descriptors(ref[text_column])[descriptors]], axis=1)
        cur = pd.concat([cur, text_descriptors(cur[text_column])[descriptors]], axis=1)
        for name in descriptors:
            metrics[name] = ValueDrift(column=name, method=getattr(policy, name).method,
                                       threshold=getattr(policy, name).threshold)
        definition = DataDefinition(
            text_columns=[text_column],
            categorical_columns=list(definition.categorical_columns or []),
            numerical_columns=list(definition.numerical_columns or []) + descriptors,
        )
    kept = [column_of[name] for name in measured] + descriptors or [text_column]
    with warnings.catch_warnings():
        # Evidently's typical-words panel refits its own classifier on drifted text and trips
        # sklearn convergence and pandas chained-assignment warnings that say nothing about the data.
        warnings.filterwarnings("ignore", module=r"sklearn\..*")
        warnings.filterwarnings("ignore", module=r"evidently\..*")
        snapshot = Report(list(metrics.values()), include_tests=True).run(
            Dataset.from_pandas(cur[kept], data_definition=definition),
            Dataset.from_pandas(ref[kept], data_definition=definition),
        )
        report_html = _titled(snapshot.get_html_str(as_iframe=False))

    signals = {}
    for name, metric in metrics.items():
        result = snapshot.metric_results[metric.metric_id]
        settings = getattr(policy, name)
        signals[name] = Signal(
            name=name,
            value=float(result.value),
            threshold=float(settings.threshold),
            drifted=any(t.status.value == "FAIL" for t in result.tests),
            method=settings.method,
            direction=(SIGNAL_METHODS | EXTRA_SIGNAL_METHODS)[name][settings.method],
            counts_toward_verdict=name in SEVERITY_SIGNALS or getattr(settings, "counts_toward_verdict", False),
        )
    signals |= _model_signals(ref, cur, policy, text_column, prediction_column, confidence_column,
                              label_column if wants_labels else None, has)
    severity = _severity(signals)
    return DriftResult(
        drift_detected=severity != "none",
        severity=severity,
        signals=signals,
        rows_reference=len(reference),
        rows_current=len(current),
        rows_sampled=len(cur),
        sample_method=sample_method,
        report_html=report_html,
    )


def _extra_signal(name: str, value: float, settings: ExtraSignalPolicy, **details: float) -> Signal:
    direction = EXTRA_SIGNAL_METHODS[name][settings.method]
    drifted = value > settings.threshold if direction == "above" else value < settings.threshold
    return Signal(name=name, value=float(value), threshold=float(settings.threshold), drifted=bool(drifted),
                  method=settings.method, direction=direction, counts_toward_verdict=settings.counts_toward_verdict,
                  details={k: float(v) for k, v in details.items()})


def _model_signals(ref: pd.DataFrame, cur: pd.DataFrame, policy: DriftPolicy, text_column: str,
                   prediction_column: str, confidence_column: str, label_column: str | None,
                   has: dict[str, bool]) -> dict[str, Signal]:
    """Embedding, performance and performance-estimate signals, on the already sampled frames."""
    signals: dict[str, Signal] = {}
    settings = policy.embedding
    if settings.enabled:
        stratify_by = prediction_column if has["prediction"] else None
        ref_rows = sample_frame(ref, settings.max_rows, policy.seed, stratify_by)[text_column]
        cur_rows = sample_frame(cur, settings.max_rows, policy.seed, stratify_by)[text_column]
        value = embedding_drift(ref_rows, cur_rows, settings.method, settings.threshold)
        signals["embedding"] = _extra_signal("embedding", value, settings, rows_reference=len(ref_rows),
                                             rows_current=len(cur_rows))
    settings = policy.performance
    if settings.enabled and label_column is not None:
        ref_labelled, cur_labelled = _labelled(ref, label_column), _labelled(cur, label_column)
        if len(cur_labelled) >= settings.min_labelled and len(ref_labelled):
            before = classification_quality(ref_labelled, label_column, prediction_column)
            after = classification_quality(cur_labelled, label_column, prediction_column)
            signals["performance"] = _extra_signal(
                "performance", before["accuracy"] - after["accuracy"], settings,
                accuracy_reference=before["accuracy"], accuracy_current=after["accuracy"],
                macro_f1_reference=before["macro_f1"], macro_f1_current=after["macro_f1"],
                macro_f1_drop=before["macro_f1"] - after["macro_f1"], labelled_rows=len(cur_labelled))
    settings = policy.performance_estimate
    if settings.enabled and has["confidence"]:
        expected_ref = float(pd.to_numeric(ref[confidence_column], errors="coerce").mean())
        expected_cur = float(pd.to_numeric(cur[confidence_column], errors="coerce").mean())
        details = {"estimated_accuracy_reference": expected_ref, "estimated_accuracy_current": expected_cur}
        if label_column is not None and len(labelled := _labelled(ref, label_column)):
            accuracy = float((labelled[label_column].astype(str) == labelled[prediction_column].astype(str)).mean())
            details["reference_calibration_gap"] = expected_ref - accuracy
        signals["performance_estimate"] = _extra_signal("performance_estimate", expected_ref - expected_cur,
                                                        settings, **details)
    return signals


def _titled(report_html: str) -> str:
    """Give Evidently's page a title, so a report downloaded from MLflow says what made it."""
    from evidently import __version__

    title = f"<title>refit drift check: Evidently {__version__} report</title>"
    if "<head>" in report_html:
        return report_html.replace("<head>", f"<head>\n    {title}", 1)
    return title + report_html


def _measured_columns(frame: pd.DataFrame, columns: list[str], label_column: str | None) -> pd.DataFrame:
    out = frame[columns].copy()
    if label_column is not None:
        out[label_column] = out[label_column].astype(str)
    return out


def _describe_sampling(reference: pd.DataFrame, current: pd.DataFrame, ref: pd.DataFrame, cur: pd.DataFrame,
                       stratify_by: str | None, seed: int) -> str:
    resized = [f"{side} {len(before)} -> {len(after)}"
               for side, before, after in (("current", current, cur), ("reference", reference, ref))
               if len(after) < len(before)]
    if not resized:
        return "all"
    how = f"stratified by {stratify_by}" if stratify_by else "uniform"
    return f"{how}, seed {seed} ({', '.join(resized)})"


@task(name="drift", cache_policy=NO_CACHE)
def check_drift(reference: pd.DataFrame, current: pd.DataFrame, policy: DriftPolicy, **columns: str) -> DriftResult:
    """Prefect task around ``measure_drift``; ``columns`` passes the column names through."""
    return measure_drift(reference, current, policy, **columns)


SEVERITY_RANK = {"none": 0, "low": 1, "high": 2}


def decide_action(result: DriftResult, window_start: str, window_end: str, labelled: int, min_labelled: int,
                  earlier: list[Trigger], cooldown_minutes: float) -> tuple[str, str]:
    """What refit does about a verdict, and why: ``none``, ``wait for labels`` or ``update``.

    The same window never triggers twice, and within the cooldown only a
    rise in severity triggers again, so one drift costs one fine-tune.
    """
    if not result.drift_detected:
        return "none", "no drift"
    same = next((t for t in earlier if (t.window_start, t.window_end) == (window_start, window_end)), None)
    if same:
        return "none", f"this window already started an update (drift run {same.run_id})"
    recent = [t for t in earlier if t.minutes_ago < cooldown_minutes]
    if recent and SEVERITY_RANK[result.severity] <= max(SEVERITY_RANK[t.severity] for t in recent):
        newest = min(recent, key=lambda t: t.minutes_ago)
        return "none", (f"cooldown: an update started {newest.minutes_ago:.0f} min ago (drift run {newest.run_id}) "
                        f"at severity {newest.severity}; cooldown is {cooldown_minutes:g} min")
    if labelled < min_labelled:
        return "wait for labels", f"{labelled} labelled rows in the window, an update needs {min_labelled}"
    return "update", f"drift at severity {result.severity} with {labelled} labelled rows"

