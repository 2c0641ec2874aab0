"""The text signal and text descriptors: how much of a window's writing has nothing like it in the reference."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from refit.errors import RefitError
from tasks.drift.encoder import _base_vocabulary, sentence_embeddings
from tasks.drift.policy import NEIGHBOURS

NOVELTY_QUANTILE = 0.95
NOVELTY_FOLDS = 5
WORD = re.compile(r"[^\W\d_]+")


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


def top_k_mean(similarity: np.ndarray, k: int) -> np.ndarray:
    """Each row's mean over its ``k`` largest similarities."""
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
    ref_score, cur_score = top_k_mean(own, k), top_k_mean(cur @ ref.T, k)
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
