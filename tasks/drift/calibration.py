"""Thresholds from the champion's own reference: quiet windows drawn from it, and the calibrations kept with it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from refit.errors import RefitError
from tasks.drift.encoder import EMBEDDING_CACHE_ROWS, encoder_fingerprint
from tasks.drift.policy import (
    CALIBRATED,
    CHAMPION_SIGNALS,
    EMBEDDING_NOVELTY,
    SEVERITY_SIGNALS,
    SIGNAL_METHODS,
    DriftPolicy,
)
from tasks.drift.text import NoveltyParts, top_k_mean

log = logging.getLogger("refit.drift")

CALIBRATION_SPLITS = 400
NULL_NEIGHBOURS = 64  # nearest reference rows kept per row for the splits; a row left short is computed whole
CALIBRATION_SUFFIX = ".calibration.json"
STORE_CALIBRATION = "calibration.json"
KEPT_CALIBRATIONS = 64  # per reference: one per window size seen; the oldest go first
_calibrated: dict[str, dict] = {}


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
            scores[short] = top_k_mean(similarity[np.ix_(short, ~in_window)], k)
        values[i] = scores[~in_window].mean() - scores[in_window].mean()
    return values


def normal_quantile(rate: float) -> float:
    """The standard normal's ``1 - rate`` quantile: how many standard deviations a quiet value stays under."""
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
    quiet = null_mean + normal_quantile(rate) * null_sd
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


def text_calibration(texts: list[str], parts: NoveltyParts, seed: int,
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


def false_alarm_rates(policy: DriftPolicy, measured: list[str], has: dict[str, bool],
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
