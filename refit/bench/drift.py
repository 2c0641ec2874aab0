"""Drift-check benchmark on real CLINC150 windows, scored by a real champion: false alarms, power and cost.

Three families of shift:

* ``between``: the default scenario's (``refit/scenarios/clinc-shift.yaml``).
  The champion knows its five reference domains plus ``oos``; shifted rows
  come from the five other domains.
* ``within``: new intents inside known domains. The champion knows 10 of the
  15 intents of every domain (a seeded draw) plus ``oos``; shifted rows come
  from the other 5 intents of the same domains: same topics, same words.
* ``domains``: one company's intents, text alone. Every pair draws its own 3
  domains and 10 of the 15 intents of each; the reference is 1,000
  training-split texts of those 30 intents, and shifted rows come from the
  other 5 intents of the same 3 domains. No ``oos``, no champion: the check
  sees the text column only, as ``refit drift REF CUR`` does on two files
  of texts. Every pair is another small data set nobody tuned anything on.

The champion of ``between`` and ``within`` is a multinomial logistic
regression on the frozen base model's mean-pooled sentence embeddings (the
ones the text signal uses), trained on 60% of each known intent's
training-split rows. It is cheap (seconds on 2 cores) and real: its
predictions and confidences come from the model, never from the true labels,
and it can only predict the intents it knows. It is not the product's LoRA
classifier; a LoRA champion would be sharper and its confidences differently
spread.

Their reference is 1,000 rows drawn from the other 40% of the training
split, which the champion never saw, scored by it and marked ``scored_on:
held_out`` with the true labels kept (what the label-free performance
estimate is calibrated on). A *quiet* window is texts of the known intents
from the validation and test splits, labels drawn from the reference's label
mix (drawing uniformly from validation and test would not be quiet: they
hold 23% ``oos`` against 1.3% in training). A second kind of quiet window
is drawn from the validation split alone as it comes, with its 5-6% ``oos``,
as the demo's no-drift window is; for ``domains`` the second kind is drawn
from the reference's own split (training texts it does not hold). A
*shifted* window replaces ``share`` of its rows with shifted texts.
Reference and windows come from different splits, as production traffic is
never the very collection the reference came from: CLINC150's splits differ
in phrasing, which every text statistic sees (``docs/drift.md``).

Every pair of ``between`` and ``within`` is checked twice: on text alone,
and with the champion's predictions and confidences. Every pair is drawn
from its own seed, so a size or share measured alone gives the same numbers
as in a full run. Thresholds come from each pair's reference
(``threshold: calibrated`` in the policy), never from these windows.

This module sits in ``refit/`` beside the CLI that runs it, but measures
``tasks.drift``: it imports it only inside functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

SCENARIO = "clinc-shift"
REFERENCE_ROWS = 1000
SHIFT_SHARE = 0.3
GRADUAL_SHARES = (0.05, 0.1, 0.2, 0.3)
CHAMPION_SHARE = 0.6        # of each known intent's training rows: the champion's; the rest: the reference's
KNOWN_INTENTS_PER_DOMAIN = 10
SEED = 0
QUIET, SHIFTED, NATURAL = 0, 1, 2
FAMILIES = ("within", "between", "domains")
CHAMPION_FAMILIES = ("within", "between")
MODES = ("text", "champion")
DOMAINS_PER_PAIR = 3
# The second kind of quiet window, by family: the validation split as it comes, or the reference's own split.
SECOND_QUIET = {"within": "val_mix", "between": "val_mix", "domains": "same_split"}

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class Pools:
    """The texts one family's windows are drawn from."""

    family: str
    train: pd.DataFrame      # known intents, training split: the champion's rows
    reference: pd.DataFrame  # known intents, training split: held out from the champion
    quiet: pd.DataFrame      # known intents, validation and test splits
    shifted: pd.DataFrame    # the shift's intents, validation and test splits
    natural: pd.DataFrame    # known intents, validation split, in its own label mix (more oos than training)
    label_shares: pd.Series  # label mix of ``reference``, which quiet windows follow
    description: str
    frame: pd.DataFrame | None = None  # ``domains``: all of CLINC150, every pair draws its own intents from it


def _split_known(frame: pd.DataFrame, known: pd.Series, shift: pd.Series, family: str, description: str,
                 champion_share: float = CHAMPION_SHARE) -> Pools:
    held_out = frame["split"].isin(["val", "test"])
    training = frame[known & (frame["split"] == "train")]
    rng = np.random.default_rng([SEED, 7])
    champion_rows = np.zeros(len(training), dtype=bool)
    for rows in training.groupby("label").indices.values():
        champion_rows[rng.choice(rows, round(champion_share * len(rows)), replace=False)] = True
    reference = training[~champion_rows].reset_index(drop=True)
    return Pools(
        family=family,
        train=training[champion_rows].reset_index(drop=True),
        reference=reference,
        quiet=frame[known & held_out].reset_index(drop=True),
        shifted=frame[shift & held_out].reset_index(drop=True),
        natural=frame[known & (frame["split"] == "val")].reset_index(drop=True),
        label_shares=reference["label"].value_counts(normalize=True).sort_index(),
        description=description,
    )


def load_pools(data_dir: Path, family: str = "between", scenario: str = SCENARIO) -> Pools:
    """One family's pools (see the module docstring)."""
    from refit.data import load_clinc150
    from refit.scenario import load_scenario

    frame = load_clinc150(data_dir)
    if family == "between":
        spec, _ = load_scenario(scenario)
        home = list(spec.reference.groups)
        other = sorted(set(frame["group"]) - set(home) - {"oos"})
        return _split_known(frame, frame["group"].isin(home), frame["group"].isin(other), family,
                            f"reference {', '.join(home)}; shift from {', '.join(other)}")
    if family == "within":
        rng = np.random.default_rng([SEED, 13])
        known: set[str] = {"oos"}
        for group in sorted(set(frame["group"]) - {"oos"}):
            intents = sorted(set(frame.loc[frame["group"] == group, "label"]))
            known |= set(rng.choice(intents, KNOWN_INTENTS_PER_DOMAIN, replace=False))
        is_known = frame["label"].isin(known)
        new = len(set(frame["label"]) - known)
        return _split_known(frame, is_known, ~is_known, family,
                            f"reference {len(known) - 1} intents (10 per domain) + oos; shift from the other {new} "
                            "intents of the same domains")
    if family == "domains":
        empty = frame.iloc[:0]
        return Pools(family, empty, empty, empty, empty, empty, pd.Series(dtype=float),
                     f"per pair: {KNOWN_INTENTS_PER_DOMAIN} of 15 intents of {DOMAINS_PER_PAIR} domains drawn anew, "
                     "no oos; shift from the other 5 intents of the same domains; text alone", frame=frame)
    raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")


def domains_pools(frame: pd.DataFrame, index: int, seed: int = SEED) -> Pools:
    """Pair ``index``'s own small data set: 3 domains, 10 of the 15 intents of each known, the other 5 new.

    The reference pool is every training-split text of the known intents
    (no champion is trained); ``natural`` holds the same, for quiet windows
    from the reference's own split.
    """
    rng = np.random.default_rng([seed, FAMILIES.index("domains"), index])
    domains = sorted(rng.choice(sorted(set(frame["group"]) - {"oos"}), DOMAINS_PER_PAIR, replace=False))
    known: set[str] = set()
    for group in domains:
        intents = sorted(set(frame.loc[frame["group"] == group, "label"]))
        known |= set(rng.choice(intents, KNOWN_INTENTS_PER_DOMAIN, replace=False))
    in_domains = frame["group"].isin(domains)
    is_known = frame["label"].isin(known)
    pools = _split_known(frame, is_known, in_domains & ~is_known, "domains",
                         f"{', '.join(domains)}: {len(known)} intents known", champion_share=0.0)
    return Pools(**{**pools.__dict__, "natural": pools.reference})


@dataclass(frozen=True)
class Champion:
    """A logistic regression on frozen base-model embeddings, trained on one family's champion rows."""

    model: object
    train_rows: int
    labels: int
    train_seconds: float

    def score(self, texts: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        """Predicted labels and their probabilities (the confidence serving logs)."""
        from tasks.drift import sentence_embeddings

        proba = self.model.predict_proba(sentence_embeddings(list(texts.astype(str))))
        return self.model.classes_[proba.argmax(axis=1)], proba.max(axis=1)


def train_champion(pools: Pools) -> Champion:
    from sklearn.linear_model import LogisticRegression

    from tasks.drift import sentence_embeddings

    start = time.perf_counter()
    features = sentence_embeddings(list(pools.train["text"]))
    model = LogisticRegression(C=10.0, max_iter=500).fit(features, pools.train["label"].to_numpy())
    return Champion(model, len(pools.train), len(model.classes_), time.perf_counter() - start)


def as_served(rows: pd.DataFrame, champion: Champion, reference: bool = False) -> pd.DataFrame:
    """Rows as serving logs them: the champion's prediction and confidence; a reference keeps its true labels."""
    predicted, confidence = champion.score(rows["text"])
    out = pd.DataFrame({"text": rows["text"].to_numpy(), "predicted_label": predicted,
                        "confidence": confidence.astype(float)})
    if reference:
        out["label"] = rows["label"].to_numpy()
        out["scored_on"] = "held_out"
    return out


def reference_rows(pools: Pools, rng: np.random.Generator, rows: int = REFERENCE_ROWS) -> pd.DataFrame:
    return pools.reference.iloc[rng.choice(len(pools.reference), rows, replace=False)]


def quiet_rows(pools: Pools, rows: int, rng: np.random.Generator, replace: bool = False) -> pd.DataFrame:
    """``rows`` held-out texts of the known intents, labels drawn from the reference's label mix.

    Without ``replace`` no text repeats (a label asked for more often than it
    has texts falls back to repeats for that label alone).
    """
    counts = rng.multinomial(rows, pools.label_shares.to_numpy())
    by_label = pools.quiet.groupby("label").indices
    picks = [rng.choice(by_label[label], n, replace=replace or n > len(by_label[label]))
             for label, n in zip(pools.label_shares.index, counts) if n]
    return pools.quiet.iloc[np.concatenate(picks)]


def window_rows(pools: Pools, rows: int, rng: np.random.Generator, shift_share: float = 0.0,
                replace: bool = False) -> pd.DataFrame:
    """``rows`` texts, ``shift_share`` of them from the shift's pool, in random order."""
    n_shifted = round(shift_share * rows)
    parts = [quiet_rows(pools, rows - n_shifted, rng, replace)]
    if n_shifted:
        parts.append(pools.shifted.iloc[rng.choice(len(pools.shifted), n_shifted,
                                                   replace=replace or n_shifted > len(pools.shifted))])
    out = pd.concat(parts)
    return out.iloc[rng.permutation(len(out))]


def pair_rows(pools: Pools, size: int, index: int, kind: int, shift_share: float = SHIFT_SHARE,
              seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference and window rows (text, label) of one pair; the same arguments always give the same pair."""
    family = FAMILIES.index(pools.family)
    rng = np.random.default_rng([seed, family, size, index, kind, round(1000 * shift_share) if kind else 0])
    if pools.frame is not None:
        return _domains_pair_rows(domains_pools(pools.frame, index, seed), size, index, kind, rng, shift_share, seed)
    reference = reference_rows(pools, rng)
    if kind == NATURAL:
        return reference, pools.natural.iloc[rng.choice(len(pools.natural), size, replace=size > len(pools.natural))]
    return reference, window_rows(pools, size, rng, shift_share if kind == SHIFTED else 0.0)


def _domains_pair_rows(pools: Pools, size: int, index: int, kind: int, rng: np.random.Generator,
                       shift_share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One ``domains`` pair: every kind of window of pair ``index`` is checked against the same reference."""
    reference = reference_rows(pools, np.random.default_rng([seed, FAMILIES.index("domains"), size, index]))
    if kind == NATURAL:  # the reference's own split, texts it does not hold
        rest = pools.reference.drop(reference.index)
        return reference, rest.iloc[rng.choice(len(rest), size, replace=False)]
    return reference, window_rows(pools, size, rng, shift_share if kind == SHIFTED else 0.0)


def pair(pools: Pools, champion: Champion | None, size: int, index: int, kind: int, shift_share: float = SHIFT_SHARE,
         mode: str = "champion") -> tuple[pd.DataFrame, pd.DataFrame]:
    """One pair as the check sees it: text alone, or served by the champion (reference scored on held-out rows)."""
    reference, current = pair_rows(pools, size, index, kind, shift_share)
    if mode == "text":
        return (reference[["text"]].reset_index(drop=True), current[["text"]].reset_index(drop=True))
    return as_served(reference, champion, reference=True), as_served(current, champion)


def evidently_default_text_drift(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[float, bool, str]:
    """Evidently's own verdict on the text column with its default method: (score, drifted, method)."""
    import warnings

    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    definition = DataDefinition(text_columns=["text"])
    metric = ValueDrift(column="text")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(sklearn|evidently)\..*")
        snapshot = Report([metric], include_tests=True).run(
            Dataset.from_pandas(current[["text"]], data_definition=definition),
            Dataset.from_pandas(reference[["text"]], data_definition=definition))
    result = snapshot.metric_results[metric.metric_id]
    method = result.metric_value_location.metric.params.get("method", "default")
    return float(result.value), any(t.status.value == "FAIL" for t in result.tests), str(method)


def _summary(results: list) -> dict:
    fired = [r.drift_detected for r in results]
    by_signal: dict[str, int] = {}
    values: dict[str, list[float]] = {}
    thresholds: dict[str, list[float]] = {}
    for result in results:
        for signal in result.signals.values():
            by_signal[signal.name] = by_signal.get(signal.name, 0) + int(signal.drifted and signal.counts_toward_verdict)
            values.setdefault(signal.name, []).append(signal.value)
            thresholds.setdefault(signal.name, []).append(signal.threshold)
    # the text value in standard deviations of the reference's per-text scores (Cohen's d), where reported
    effects = [r.signals["text"].value / r.signals["text"].details["reference_scores_sd"] for r in results
               if "text" in r.signals and r.signals["text"].details.get("reference_scores_sd")]
    return {"detected": int(sum(fired)), "rate": sum(fired) / len(fired),
            "severity": {level: [r.severity for r in results].count(level) for level in ("none", "low", "high")},
            "counted_signal_fired": by_signal,
            "signal_range": {name: [round(min(v), 4), round(max(v), 4)] for name, v in values.items()},
            "threshold_range": {name: [round(min(v), 4), round(max(v), 4)] for name, v in thresholds.items()},
            **({"text_effect_range": [round(min(effects), 3), round(max(effects), 3)]} if effects else {})}


def evaluate(pools: Pools, champion: Champion | None, policy, size: int, pairs: int, shares: list[float], mode: str,
             baseline_pairs: int = 0, progress: Progress | None = None) -> list[dict]:
    """False alarms on ``pairs`` quiet pairs of each kind and detections on ``pairs`` shifted pairs per share.

    The second kind of quiet window is the family's ``SECOND_QUIET``; its
    rate is reported under that name (``false_alarm_rate_val_mix`` or
    ``false_alarm_rate_same_split``).
    """
    from tasks.drift import measure_drift

    def run(kind: int, share: float) -> tuple[list, list[float], dict]:
        results, seconds, evidently = [], [], {"fired": [], "seconds": []}
        for index in range(pairs):
            reference, current = pair(pools, champion, size, index, kind, share, mode)
            start = time.perf_counter()
            results.append(measure_drift(reference, current, policy, report=False))
            seconds.append(time.perf_counter() - start)
            if index < baseline_pairs and kind != NATURAL:
                start = time.perf_counter()
                _, drifted, evidently["method"] = evidently_default_text_drift(reference, current)
                evidently["seconds"].append(time.perf_counter() - start)
                evidently["fired"].append(drifted)
            if progress:
                progress(f"{pools.family} {mode} {size} rows " + (f"{share:.0%}" if kind == SHIFTED else "quiet"), 1)
        return results, seconds, evidently

    quiet, quiet_seconds, quiet_evidently = run(QUIET, 0.0)
    natural, natural_seconds, _ = run(NATURAL, 0.0)
    quiet_seconds += natural_seconds
    second = SECOND_QUIET[pools.family]
    rows = []
    for share in shares:
        shifted, seconds, evidently = run(SHIFTED, share)
        row = {"family": pools.family, "mode": mode, "size": size, "shift_share": share, "pairs": pairs,
               "false_alarm_rate": _summary(quiet)["rate"], f"false_alarm_rate_{second}": _summary(natural)["rate"],
               "detection_rate": _summary(shifted)["rate"],
               "quiet": _summary(quiet), f"quiet_{second}": _summary(natural), "shifted": _summary(shifted),
               "second_quiet": second, "seconds_per_check": float(np.mean(quiet_seconds + seconds))}
        if quiet_evidently["fired"]:
            n = len(quiet_evidently["fired"])
            row["evidently_default"] = {
                "pairs": n, "method": quiet_evidently["method"],
                "false_alarms": int(sum(quiet_evidently["fired"])), "detected": int(sum(evidently["fired"])),
                "seconds_per_check": float(np.mean(quiet_evidently["seconds"] + evidently["seconds"]))}
        rows.append(row)
    return rows


def scale(pools: Pools, champion: Champion, policy, rows_list: list[int], repeats: int = 3,
          progress: Progress | None = None) -> dict:
    """Time of validating and checking one window of each size in ``rows_list`` against a 1,000-row reference.

    Large windows are quiet windows drawn with replacement, served by the
    champion, with request ids and timestamps, validated with the request-log
    schema check. Each size is timed ``repeats`` times and the median kept;
    embeddings of texts already seen are reused, as in a long-running monitor.
    """
    from tasks.drift import measure_drift
    from tasks.validate import split_bad_inference_rows

    rng = np.random.default_rng([SEED, 1])
    reference = as_served(reference_rows(pools, rng), champion, reference=True)
    runs = []
    for rows in rows_list:
        current = as_served(window_rows(pools, rows, rng, replace=True), champion)
        current.insert(0, "request_id", [f"r{i}" for i in range(rows)])
        current.insert(1, "timestamp", pd.Timestamp("2026-03-01", tz="UTC") + pd.to_timedelta(np.arange(rows), "s"))
        validate_seconds, drift_seconds = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            kept, _ = split_bad_inference_rows(current)
            validate_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = measure_drift(reference, kept, policy, report=False)
            drift_seconds.append(time.perf_counter() - start)
        validate_s, drift_s = float(np.median(validate_seconds)), float(np.median(drift_seconds))
        runs.append({"rows": rows, "rows_sampled": result.rows_sampled, "sample_method": result.sample_method,
                     "repeats": repeats, "validate_seconds": validate_s, "drift_seconds": drift_s,
                     "total_seconds": validate_s + drift_s, "drift_detected": result.drift_detected})
        if progress:
            progress("scale", 1)
    out: dict = {"runs": runs, "max_sample_rows": policy.max_sample_rows}
    if len(runs) >= 2:
        small, large = runs[0], runs[-1]
        out["rows_ratio"] = large["rows"] / small["rows"]
        out["time_ratio"] = large["total_seconds"] / small["total_seconds"]
    return out


def run_benchmark(data_dir: Path, pairs: int, sizes: list[int], scale_rows: list[int], baseline_pairs: int,
                  shift_share: float = SHIFT_SHARE, policy_name: str = "drift", families: tuple[str, ...] = FAMILIES,
                  gradual: tuple[float, ...] = GRADUAL_SHARES, progress: Progress | None = None) -> dict:
    """The whole benchmark as one JSON-ready dict.

    Every family is measured at ``shift_share`` in each size; ``within`` also
    at each ``gradual`` share (the gradual family: the same new intents
    arriving a few at a time). ``between`` and ``within`` are checked on text
    alone and with their champion's outputs, ``domains`` on text alone.
    """
    import os

    from tasks.drift import load_drift_policy

    policy, policy_path = load_drift_policy(policy_name)
    started = time.perf_counter()
    pools = {family: load_pools(data_dir, family) for family in families}
    champions = {}
    for family, family_pools in pools.items():
        if family in CHAMPION_FAMILIES:
            champions[family] = train_champion(family_pools)
            if progress:
                progress(f"champion {family}", 0)
    champion_report = {}
    for family, champion in champions.items():
        rows = pools[family].reference
        predicted, confidence = champion.score(rows["text"])
        champion_report[family] = {
            "kind": "logistic regression on frozen all-MiniLM-L6-v2 mean-pooled embeddings",
            "train_rows": champion.train_rows, "labels": champion.labels,
            "train_seconds": round(champion.train_seconds, 1),
            "held_out_accuracy": float(np.mean(predicted == rows["label"].to_numpy())),
            "held_out_mean_confidence": float(confidence.mean())}
    results = []
    for family in families:
        shares = sorted({shift_share, *gradual}) if family == "within" else [shift_share]
        for size in sizes:
            for mode in MODES if family in champions else ("text",):
                results += evaluate(pools[family], champions.get(family), policy, size, pairs, shares, mode,
                                    baseline_pairs if mode == "text" else 0, progress)
    out = {
        "setup": {
            "data": "CLINC150", "reference_rows": REFERENCE_ROWS, "seed": SEED, "policy": str(policy_path),
            "families": {family: pools[family].description for family in families}, "shift_share": shift_share,
            "gradual_shares": list(gradual), "max_sample_rows": policy.max_sample_rows, "cpus": os.cpu_count(),
            "false_alarm_rate": policy.false_alarm_rate,
        },
        "champion": champion_report,
        "results": results,
    }
    first = next(iter(champions), None)
    out["scale"] = scale(pools[first], champions[first], policy, scale_rows, progress=progress) \
        if scale_rows and first else None
    out["seconds"] = time.perf_counter() - started
    return out


def tables(result: dict) -> list:
    """Rich tables of a ``run_benchmark`` result."""
    from rich.table import Table

    setup = result["setup"]
    table = Table(title=(f"Drift check on CLINC150: reference {setup['reference_rows']} rows; "
                         f"{result['results'][0]['pairs'] if result['results'] else 0} quiet and shifted pairs per "
                         f"row; thresholds from each reference at a false-alarm rate of {setup['false_alarm_rate']:g}"))
    for column in ("family", "shift", "rows", "signals", "false alarms", "quiet 2*", "detected", "fired (shifted)",
                   "s/check"):
        table.add_column(column, justify="left" if column in ("family", "signals", "fired (shifted)") else "right")
    methods = set()
    for row in result["results"]:
        n = row["pairs"]
        fired = ", ".join(f"{name} {count}" for name, count in row["shifted"]["counted_signal_fired"].items() if count)
        table.add_row(row["family"], f"{row['shift_share']:.0%}", str(row["size"]),
                      "text alone" if row["mode"] == "text" else "+ predictions, confidences",
                      f"{row['quiet']['detected']}/{n} ({row['false_alarm_rate']:.0%})",
                      f"{row['quiet_' + row['second_quiet']]['detected']}/{n}",
                      f"{row['shifted']['detected']}/{n} ({row['detection_rate']:.0%})", fired,
                      f"{row['seconds_per_check']:.2f}")
        baseline = row.get("evidently_default")
        if baseline:
            methods.add(baseline["method"])
            table.add_row("", "", "", "Evidently default*", f"{baseline['false_alarms']}/{baseline['pairs']}", "",
                          f"{baseline['detected']}/{baseline['pairs']}", "", f"{baseline['seconds_per_check']:.2f}")
    caption = [f"{family}: {text}" for family, text in setup["families"].items()]
    caption.append("false alarms: quiet windows from other splits, in the reference's label mix; quiet 2: the "
                   "validation split as it comes (more oos), or for domains the reference's own split")
    if methods:
        caption.append(f"* Evidently's default text drift alone ({', '.join(sorted(methods))}), on the first pairs")
    table.caption = "\n".join(caption)
    out = [table] if result["results"] else []
    if result.get("scale"):
        scaled = result["scale"]
        cost = Table(title=f"Drift check cost by window size (windows sampled to {scaled['max_sample_rows']} rows, "
                           f"{setup['cpus']} CPUs, median of {scaled['runs'][0]['repeats']} runs)")
        for column in ("window rows", "rows measured", "validate s", "drift s", "total s"):
            cost.add_column(column, justify="right")
        for run in scaled["runs"]:
            cost.add_row(f"{run['rows']:,}", f"{run['rows_sampled']:,}", f"{run['validate_seconds']:.2f}",
                         f"{run['drift_seconds']:.2f}", f"{run['total_seconds']:.2f}")
        if "time_ratio" in scaled:
            cost.caption = f"{scaled['rows_ratio']:.0f}x the rows took {scaled['time_ratio']:.2f}x the time"
        out.append(cost)
    return out
