"""Which rows a check compares: the reference as the window was served, both sampled down to the policy's size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.drift.policy import DESCRIPTOR_SIGNALS, HELD_OUT, SCORED_ON, SIGNAL_METHODS, DriftPolicy
from tasks.drift.text import text_descriptors

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


def _measured_columns(frame: pd.DataFrame, columns: list[str], stratify_by: str | None) -> pd.DataFrame:
    """A copy of ``columns``, the one sampling is stratified by as text."""
    out = frame[columns].copy()
    if stratify_by is not None:
        out[stratify_by] = out[stratify_by].astype(str)
    return out


def _describe_sampling(reference: pd.DataFrame, current: pd.DataFrame, ref: pd.DataFrame, cur: pd.DataFrame,
                      stratify_by: str | None, seed: int) -> str:
    """How the frames were cut down, for the verdict: ``all``, or the method, seed and sizes."""
    resized = [f"{side} {len(before)} -> {len(after)}"
               for side, before, after in (("current", current, cur), ("reference", reference, ref))
               if len(after) < len(before)]
    if not resized:
        return "all"
    how = f"stratified by {stratify_by}" if stratify_by else "uniform"
    return f"{how}, seed {seed} ({', '.join(resized)})"


@dataclass(frozen=True)
class Sampled:
    """The two frames one check measures, sampled down to the policy's size, and what they let it measure."""

    ref: pd.DataFrame
    cur: pd.DataFrame
    column_of: dict[str, str]  # signal -> the column it reads
    has: dict[str, bool]  # text, prediction, confidence: whether both frames carry the column
    held_out: bool  # the reference's predictions are on rows the champion never trained on
    measured: list[str]  # the text, prediction and confidence signals the policy enables and the frames allow
    descriptors: list[str]  # the descriptor signals the policy enables (computed columns of their own)
    stratify_by: str | None
    label_column: str | None  # labels on the reference, None without them
    wants_labels: bool  # labels on both sides, for the performance signal
    sample_method: str

    @property
    def names(self) -> list[str]:
        """The signals measured on these columns (the model signals come after them)."""
        return self.measured + self.descriptors


def sample_for_check(reference: pd.DataFrame, current: pd.DataFrame, policy: DriftPolicy, *, text_column: str,
                     prediction_column: str, confidence_column: str, label_column: str) -> Sampled:
    """Both frames cut to the columns a check reads and sampled (stratified by prediction where there is one).

    Labels on the reference calibrate the performance estimate; on both sides
    (and with the performance signal on) they measure performance.
    """
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
    return Sampled(ref=ref, cur=cur, column_of=column_of | {name: name for name in descriptors}, has=has,
                   held_out=held_out, measured=measured, descriptors=descriptors, stratify_by=stratify_by,
                   label_column=label_column if has_labels else None, wants_labels=wants_labels,
                   sample_method=sample_method)
