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
imports torch or transformers (``refit/runtime/encoder_onnx.py``, which holds
the encoder's one forward pass).

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

from tasks.drift.calibration import (
    CALIBRATION_SPLITS,
    CALIBRATION_SUFFIX,
    KEPT_CALIBRATIONS,
    NULL_NEIGHBOURS,
    STORE_CALIBRATION,
    KeptCalibrations,
    calibration_key,
    novelty_null,
    text_threshold,
)
from tasks.drift.encoder import (
    EMBEDDING_BATCH,
    EMBEDDING_CACHE_ROWS,
    EMBEDDING_MAX_LENGTH,
    EMBEDDING_RUNTIMES,
    EMBEDDING_SCHEME,
    ENCODER_THREADS,
    ONNX_BATCH,
    PROBE_TEXTS,
    encoder_cache_dir,
    encoder_fingerprint,
    sentence_embeddings,
)
from tasks.drift.kept_embeddings import (
    EMBEDDINGS_SUFFIX,
    embeddings_sidecar,
    reference_embeddings_payload,
    reuse_reference_embeddings,
    texts_fingerprint,
)
from tasks.drift.measure import _drift_task, measure_drift
from tasks.drift.model_signals import (
    LOW_CONFIDENCE_QUANTILE,
    classification_quality,
    expected_accuracy,
    isotonic_fit,
)
from tasks.drift.policy import (
    CALIBRATED,
    CALIBRATED_METHODS,
    CATEGORICAL_METHODS,
    CHAMPION_SIGNALS,
    DESCRIPTOR_SIGNALS,
    EMBEDDING_NOVELTY,
    EXTRA_SIGNAL_METHODS,
    HELD_OUT,
    LABEL_SHIFT,
    NATIVE_METHODS,
    NEIGHBOURS,
    NOVELTY,
    NUMERICAL_METHODS,
    SCORED_ON,
    SEVERITY_SIGNALS,
    SIGNAL_METHODS,
    TEXT_METHODS,
    ChampionSignalPolicy,
    Direction,
    DriftPolicy,
    DriftResult,
    EmbeddingSignalPolicy,
    ExtraSignalPolicy,
    PerformanceSignalPolicy,
    Signal,
    SignalPolicy,
    TextSignalPolicy,
    load_drift_policy,
)
from tasks.drift.prediction import LABEL_SHIFT_DRAWS, label_shift, label_shift_test, wasserstein_distance
from tasks.drift.sampling import SERVED_COLUMNS, reference_as_served, sample_frame
# The encoder's cache and session and the Evidently report, which tests reach into: importable here as before.
from tasks.drift.encoder import _base_model_path, _base_tokenizer, _embedded, _onnx_encoder  # noqa: F401
from tasks.drift.report import _evidently_report  # noqa: F401
from tasks.drift.text import (
    NOVELTY_FOLDS,
    NOVELTY_QUANTILE,
    NoveltyParts,
    embedding_drift,
    embedding_novelty,
    novelty_share,
    text_descriptors,
)

__all__ = [
    "CALIBRATED", "CALIBRATED_METHODS", "CALIBRATION_SPLITS", "CALIBRATION_SUFFIX", "CATEGORICAL_METHODS",
    "CHAMPION_SIGNALS", "DESCRIPTOR_SIGNALS", "EMBEDDINGS_SUFFIX", "EMBEDDING_BATCH", "EMBEDDING_CACHE_ROWS",
    "EMBEDDING_MAX_LENGTH", "EMBEDDING_NOVELTY", "EMBEDDING_RUNTIMES", "EMBEDDING_SCHEME", "ENCODER_THREADS",
    "EXTRA_SIGNAL_METHODS", "HELD_OUT", "KEPT_CALIBRATIONS", "LABEL_SHIFT", "LABEL_SHIFT_DRAWS",
    "LOW_CONFIDENCE_QUANTILE", "NATIVE_METHODS", "NEIGHBOURS", "NOVELTY", "NOVELTY_FOLDS", "NOVELTY_QUANTILE",
    "NULL_NEIGHBOURS", "NUMERICAL_METHODS", "ONNX_BATCH", "PROBE_TEXTS", "SCORED_ON", "SERVED_COLUMNS",
    "SEVERITY_SIGNALS", "SIGNAL_METHODS", "STORE_CALIBRATION", "TEXT_METHODS",
    "ChampionSignalPolicy", "Direction", "DriftPolicy", "DriftResult", "EmbeddingSignalPolicy", "ExtraSignalPolicy",
    "KeptCalibrations", "NoveltyParts", "PerformanceSignalPolicy", "Signal", "SignalPolicy", "TextSignalPolicy",
    "calibration_key", "check_drift", "classification_quality", "embedding_drift", "embedding_novelty",
    "embeddings_sidecar", "encoder_cache_dir", "encoder_fingerprint", "expected_accuracy", "isotonic_fit",
    "label_shift", "label_shift_test", "load_drift_policy", "measure_drift", "novelty_null", "novelty_share",
    "reference_as_served", "reference_embeddings_payload", "reuse_reference_embeddings", "sample_frame",
    "sentence_embeddings", "text_descriptors", "text_threshold", "texts_fingerprint", "wasserstein_distance",
]


def __getattr__(name: str):
    """``check_drift``, the Prefect task, is built on first use: ``refit drift`` never imports Prefect for it."""
    if name == "check_drift":
        return _drift_task()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
