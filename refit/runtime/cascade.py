"""The cascade as served: a cheap student answers the texts it is sure of, the champion the rest.

In each micro-batch the student scores every text; only the texts whose
student margin (the gap between its two likeliest labels) is below the
calibrated threshold go to the champion's forward pass. Every answer says
which tier gave it (``served_by``). The student is a linear model over
TF-IDF word and character n-grams and the mean of the champion's own input
embeddings over each text's word pieces
(``WordVectors``), distilled from the champion (``tasks/cascade.py`` builds,
calibrates and gates it).

A student is stored as JSON (vocabularies, labels, settings) plus an ``.npz``
of arrays read with ``allow_pickle=False``: nothing executable is loaded, as
adapters load from safetensors only. A version whose cascade did not pass its
gate (tag ``refit.cascade_verdict``) is served by its champion alone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("refit.serving")

STUDENT, CHAMPION = "student", "champion"
STUDENT_JSON, STUDENT_ARRAYS = "student.json", "student.npz"
MAX_WORD_PIECES = 128  # a text's word pieces a student's word vectors average, at most
# What a cascade's threshold applies to: the gap between the student's two likeliest labels' probabilities, or
# (students stored before margins) the likeliest one's. At the same calibration disagreement, the margin lets the
# student answer more of the texts (measured in docs/cascade.md).
MARGIN, PROBABILITY = "margin", "probability"
ARTIFACT_DIR = "cascade"  # in the cascade run: student.json, student.npz, cascade.json, cascade.html
VERDICT_TAG, THRESHOLD_TAG, RUN_TAG = "refit.cascade_verdict", "refit.cascade_threshold", "refit.cascade_run_id"
SHARE_TAG = "refit.cascade_student_share"
GUARD_TAG = "refit.cascade_guard"  # JSON: max_share_drop and guard_min_texts of the policy it was gated under
FALLBACK_TAG = "refit.cascade_fallback"  # set when the live guard tripped: the reason; the cascade is not loaded again


@dataclass(frozen=True)
class WordVectors:
    """The champion's own input embeddings, averaged over each text's word pieces: a dense feature per text.

    Read from the served champion (``of``), never stored with the student: a
    student fitted with them is loaded with its champion (``Student.load``).
    Each text's mean is L2-normalised and times ``scale``, against the
    n-gram vectorizers' rows of norm 1.
    """

    table: np.ndarray  # (vocabulary, dim): the champion's input embeddings, not a copy
    tokenizer: object  # the champion's
    scale: float

    @classmethod
    def of(cls, model, tokenizer, scale: float) -> WordVectors | None:
        """A model's input embeddings and tokenizer; None when it has none to read."""
        try:
            table = model.get_input_embeddings().weight.detach().float().numpy()
        except (AttributeError, TypeError, RuntimeError) as exc:
            log.info("no input embeddings to read (%s): the student keeps its n-grams alone", exc)
            return None
        return cls(table, tokenizer, float(scale))

    def identity(self) -> dict:
        """What a saved student records of the table it was fitted on, to refuse another champion's."""
        import hashlib

        return {"shape": list(self.table.shape), "sha256": hashlib.sha256(self.table.tobytes()).hexdigest()}

    def features(self, texts: Sequence[str]) -> np.ndarray:
        from scipy.sparse import csr_matrix

        if not len(texts):
            return np.zeros((0, self.table.shape[1]), dtype=np.float32)
        pieces = self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                                max_length=MAX_WORD_PIECES)["input_ids"]
        counts = np.array([len(row) for row in pieces])
        ids = np.fromiter((i for row in pieces for i in row), dtype=np.int64, count=int(counts.sum()))
        means = csr_matrix((np.repeat(1.0 / np.maximum(counts, 1), counts).astype(np.float32), ids,
                            np.concatenate([[0], np.cumsum(counts)])), shape=(len(texts), self.table.shape[0]))
        out = np.asarray(means @ self.table, dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0) * self.scale


@dataclass(frozen=True)
class Student:
    """A linear layer over the champion's labels, on TF-IDF n-grams and the champion's word embeddings.

    One vectorizer per entry of ``vectorizers``; ``word_vectors`` is None for
    a student of n-grams alone (and for those stored before it existed).
    """

    labels: tuple[str, ...]
    vectorizers: tuple  # fitted sklearn TfidfVectorizers
    coef: np.ndarray  # (labels, features): the n-grams' columns, then the word vectors' dimensions
    intercept: np.ndarray  # (labels,)
    word_vectors: WordVectors | None = None
    routing: str = MARGIN  # the score the cascade's threshold applies to (``answer``)
    weights: np.ndarray = field(init=False, repr=False)  # coef transposed, C order

    def __post_init__(self) -> None:
        if self.routing not in (MARGIN, PROBABILITY):
            raise ValueError(f"a student routes on {MARGIN!r} or {PROBABILITY!r}, not {self.routing!r}")
        # sparse @ dense copies a dense operand that is not C-contiguous, or not of the sparse matrix's dtype, on
        # every call (17 MB for 151 labels): transposed once here and multiplied in float32, a one-text call
        # costs about a millisecond instead of 25.
        object.__setattr__(self, "weights", np.ascontiguousarray(np.asarray(self.coef, dtype=np.float32).T))

    def features(self, texts: Sequence[str]):
        """The n-gram features (sparse); the word vectors' dense block is ``dense``."""
        from scipy.sparse import hstack

        return hstack([v.transform(list(texts)) for v in self.vectorizers], format="csr")

    def dense(self, texts: Sequence[str]) -> np.ndarray | None:
        return self.word_vectors.features(texts) if self.word_vectors is not None else None

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        sparse = self.features(texts).astype(np.float32)
        logits = np.asarray(sparse @ self.weights[: sparse.shape[1]]) + self.intercept
        dense = self.dense(texts)
        if dense is not None:
            logits += dense @ self.weights[sparse.shape[1] :]
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        labels, confidence, _ = self.answer(texts)
        return labels, confidence

    def answer(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Each text's likeliest label, its probability, and the score the cascade's threshold applies to: the
        gap to the second likeliest label's probability (``routing`` margin), or the probability itself."""
        if not texts:
            return [], np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
        proba = self.probabilities(texts)
        best = proba.argmax(axis=1)
        confidence = proba[np.arange(len(best)), best].astype(np.float32)
        score = confidence
        if self.routing == MARGIN:
            second = np.partition(proba, -2, axis=1)[:, -2] if proba.shape[1] > 1 else 0.0
            score = (confidence - second).astype(np.float32)
        return [self.labels[i] for i in best], confidence, score

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        specs = [{"params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vec.get_params().items()
                             if k in _PARAMS},
                  "vocabulary": {term: int(i) for term, i in vec.vocabulary_.items()}} for vec in self.vectorizers]
        spec = {"labels": list(self.labels), "vectorizers": specs, "routing": self.routing}
        if self.word_vectors is not None:  # read from the champion again when loaded
            spec["word_vectors"] = {"scale": self.word_vectors.scale} | self.word_vectors.identity()
        (directory / STUDENT_JSON).write_text(json.dumps(spec))
        arrays = {f"idf_{i}": vec.idf_ for i, vec in enumerate(self.vectorizers)}
        np.savez(directory / STUDENT_ARRAYS, coef=self.coef.astype(np.float32),
                 intercept=self.intercept.astype(np.float32), **arrays)
        return directory

    @classmethod
    def load(cls, directory: Path, champion=None) -> Student:
        """The student saved in ``directory``; one fitted with word vectors reads them from its ``champion``."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        spec = json.loads((Path(directory) / STUDENT_JSON).read_text())
        words = None
        if "word_vectors" in spec:
            words = WordVectors.of(getattr(champion, "model", None), getattr(champion, "tokenizer", None),
                                   spec["word_vectors"]["scale"])
            if words is None:
                raise ValueError(f"the student in {directory} reads its champion's input embeddings: load it with "
                                 "the served champion it was fitted on")
            fitted_on = {k: spec["word_vectors"][k] for k in ("shape", "sha256")}
            if words.identity() != fitted_on:
                raise ValueError(f"the student in {directory} was fitted on other input embeddings ({fitted_on}) "
                                 f"than this champion's ({words.identity()})")
        with np.load(Path(directory) / STUDENT_ARRAYS, allow_pickle=False) as arrays:
            vectorizers = []
            for i, vec_spec in enumerate(spec["vectorizers"]):
                params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vec_spec["params"].items()}
                vec = TfidfVectorizer(**params, vocabulary=vec_spec["vocabulary"])
                vec.idf_ = arrays[f"idf_{i}"]
                vectorizers.append(vec)
            return cls(tuple(spec["labels"]), tuple(vectorizers), arrays["coef"], arrays["intercept"], words,
                       spec.get("routing", PROBABILITY))


# The vectorizer settings a student records (plain values only).
_PARAMS = ("analyzer", "ngram_range", "lowercase", "sublinear_tf", "min_df", "strip_accents", "norm", "use_idf",
           "smooth_idf", "token_pattern", "binary", "max_df")


@dataclass
class TierStats:
    """What each tier answered and what it cost, since the cascade was loaded (inference thread writes)."""

    texts: int = 0
    student_texts: int = 0
    student_cpu_seconds: float = 0.0
    champion_cpu_seconds: float = 0.0  # of the escalated texts' passes
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, texts: int, student: int, student_cpu: float, champion_cpu: float) -> None:
        with self._lock:
            self.texts += texts
            self.student_texts += student
            self.student_cpu_seconds += student_cpu
            self.champion_cpu_seconds += champion_cpu

    @property
    def student_share(self) -> float:
        return self.student_texts / self.texts if self.texts else 0.0

    def cpu_seconds_per_1k(self) -> dict[str, float]:
        """CPU-seconds per 1,000 texts answered: the student's (it scores every text), the champion's, the total."""
        if not self.texts:
            return {STUDENT: 0.0, CHAMPION: 0.0, "cascade": 0.0}
        per = 1000 / self.texts
        return {STUDENT: self.student_cpu_seconds * per, CHAMPION: self.champion_cpu_seconds * per,
                "cascade": (self.student_cpu_seconds + self.champion_cpu_seconds) * per}


@dataclass
class ShareGuard:
    """Live guard on the student's share over the newest ``min_texts`` texts.

    A share below the gated share minus ``max_drop`` means the traffic got
    harder than what the cascade was gated on: the guard trips, once, and
    the champion answers alone from then on.
    """

    gated_share: float
    max_drop: float
    min_texts: int
    tripped: str | None = None
    recorded: bool = False  # the server wrote the trip to MLflow
    _passes: deque = field(default_factory=deque, repr=False)  # (texts, student texts) per pass
    _texts: int = 0
    _student: int = 0

    def observe(self, texts: int, student: int) -> str | None:
        """Count one pass; returns the reason once the guard has tripped."""
        self._passes.append((texts, student))
        self._texts, self._student = self._texts + texts, self._student + student
        while self._passes and self._texts - self._passes[0][0] >= self.min_texts:
            old_texts, old_student = self._passes.popleft()
            self._texts, self._student = self._texts - old_texts, self._student - old_student
        floor = self.gated_share - self.max_drop
        if self.tripped is None and self._texts >= self.min_texts and self._student / self._texts < floor:
            self.tripped = (f"student share {self._student / self._texts:.3f} over the last {self._texts} texts fell "
                            f"below {floor:.3f} (gated share {self.gated_share:.3f} - max_share_drop "
                            f"{self.max_drop:.3f}): traffic got harder; the champion serves alone")
            log.warning("cascade guard tripped: %s", self.tripped)
        return self.tripped


@dataclass
class CascadeModel:
    """A served champion with its student in front: the same ``predict`` as ``ServedModel``, plus the tier."""

    champion: object  # refit.runtime.served.ServedModel
    student: Student
    threshold: float
    stats: TierStats = field(default_factory=TierStats)
    guard: ShareGuard | None = None

    @property
    def version(self) -> int:
        return self.champion.version

    @property
    def runtime(self) -> str:
        return f"cascade+{self.champion.runtime}"

    @property
    def labels(self) -> tuple[str, ...]:
        return self.champion.labels

    def predict(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        labels, confidence, _ = self.predict_tiers(texts)
        return labels, confidence

    def predict_tiers(self, texts: Sequence[str], workers: int = 1) -> tuple[list[str], np.ndarray, list[str]]:
        """Labels, confidences and the tier that answered each text, in the order given.

        ``workers`` > 1 runs the champion's batches side by side (bulk
        scoring that meters nothing; ``ServedModel.probabilities_of``): the
        same answers as one worker.
        """
        more = {"workers": workers} if workers > 1 else {}
        if self.guard is not None and self.guard.tripped:
            start = time.process_time()
            labels, confidence = self.champion.predict(texts, **more)
            self.stats.record(len(texts), 0, 0.0, time.process_time() - start)
            return list(labels), confidence, served_by_champion(texts)
        start = time.process_time()
        labels, confidence, escalated = self._student_first(texts)
        student_cpu = time.process_time() - start
        champion = self.champion.predict([texts[i] for i in escalated], **more) if escalated else ([], [])
        served_by = _escalated_to(labels, confidence, escalated, *champion)
        self.stats.record(len(texts), len(texts) - len(escalated), student_cpu,
                          time.process_time() - start - student_cpu)
        if self.guard is not None:
            self.guard.observe(len(texts), len(texts) - len(escalated))
        return labels, confidence, served_by

    def answers_given(self, texts: Sequence[str], champion_answers: dict[str, tuple[str, float]]
                      ) -> tuple[list[str], np.ndarray, list[str]]:
        """What ``predict_tiers`` answers, where this champion's answer to every text is known already.

        ``champion_answers``: text -> (label, confidence), as this champion
        answered when served (an evaluation of the same adapter on the same
        runtime). The student runs; the texts it escalates take the known
        answer instead of the champion's pass. Meters nothing.
        """
        labels, confidence, escalated = self._student_first(texts)
        known = [champion_answers[texts[i]] for i in escalated]
        served_by = _escalated_to(labels, confidence, escalated, [k[0] for k in known], [k[1] for k in known])
        return labels, confidence, served_by

    def _student_first(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray, list[int]]:
        """The student's label and confidence for each text, and the positions it leaves to the champion."""
        labels, confidence, score = self.student.answer(texts)
        return list(labels), np.array(confidence, dtype=np.float32), np.flatnonzero(score < self.threshold).tolist()


def _escalated_to(labels: list[str], confidence: np.ndarray, escalated: list[int], champion_labels: Sequence[str],
                  champion_confidence: Sequence[float]) -> list[str]:
    """Put the champion's answers (in ``escalated`` order) in place of the student's; returns each text's tier."""
    served_by = [STUDENT] * len(labels)
    for row, i in enumerate(escalated):
        labels[i], confidence[i], served_by[i] = champion_labels[row], champion_confidence[row], CHAMPION
    return served_by


def served_by_champion(texts: Sequence[str]) -> list[str]:
    return [CHAMPION] * len(texts)


def student_share(window) -> float | None:
    """Share of a request-log window (a DataFrame) the student answered; None when no row says.

    The monitor and ``refit report`` read it: a falling share means the
    traffic moved away from what the student is sure of.
    """
    if "served_by" not in window.columns:
        return None
    tiers = window["served_by"].dropna()
    return float((tiers == STUDENT).mean()) if len(tiers) else None
