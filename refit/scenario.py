"""Scenarios: a data set, what the champion knows, and how traffic shifts.

A scenario is a small YAML file (``refit/scenarios/clinc-shift.yaml`` is the
default, documented field by field). ``build`` turns it into the concrete
frames every flow uses, deterministically for its seed: the champion's
training data, its golden set (never trained on), a no-drift window, one
window per shift, each shift's test texts (scored for the report as
``external`` accuracy; they never judge a gate), and a hotfix file.

A scenario simulates traffic. It may write requests and delayed labels and
score models for a report, but nothing it knows feeds a decision: the gate
judges each update on a fresh holdout of the update's own labels and on the
golden suite that grows with every promotion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from refit import data
from refit.errors import RefitError
from refit.policy import StrictModel, load_yaml_model, resolve

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


class Source(StrictModel):
    kind: Literal["clinc150", "hub", "file"] = "clinc150"
    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    split_column: str | None = None
    group_column: str | None = None


class Reference(StrictModel):
    groups: list[str]
    sparse_groups: list[str] | None = Field(
        None, description="Groups whose labels v1 learns from sparse_per_label rows each; None: every group not in "
                          "groups. Any other group is never seen by v1: its labels are new when it arrives.")
    max_per_label: int | None = Field(None, ge=1)
    sparse_per_label: int = Field(5, ge=0)


class Shift(StrictModel):
    """The one-shift form: ``shift.groups`` plus ``windows.shifted_*``."""

    groups: list[str]


class ShiftSpec(StrictModel):
    """One shift of traffic: ``rows`` requests, ``share`` of them from ``groups``, the rest from the reference."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    groups: list[str] = Field(min_length=1)
    rows: int = Field(ge=1)
    share: float = Field(gt=0, le=1)
    labelled_share: float = Field(gt=0, le=1, description="With labelling all: the share of each window's "
                                  "requests whose labels arrive.")
    windows: int = Field(1, ge=1, description="The shift's rows spread over this many windows, in order.")
    label_delay_windows: int = Field(0, ge=0, description="A window's labels arrive this many windows later.")
    labelling: Literal["all", "requested"] = Field(
        "all", description="all: labelled_share of every window is labelled; requested: the simulated labellers "
                           "answer only the rows refit asked for (refit labels request).")
    label_budget_per_window: int = Field(40, ge=1, description="labelling requested: labels asked for per window.")

    @model_validator(mode="after")
    def _enough_rows(self) -> "ShiftSpec":
        if self.rows < self.windows:
            raise ValueError(f"shift {self.name}: {self.rows} rows cannot fill {self.windows} windows")
        return self


class Windows(StrictModel):
    no_drift_rows: int = Field(ge=1)
    shifted_rows: int | None = Field(None, ge=1)
    shifted_share: float | None = Field(None, gt=0, le=1)
    labelled_share: float | None = Field(None, gt=0, le=1)


class Evaluation(StrictModel):
    golden_max_rows: int = Field(ge=1)
    shifted_max_rows: int = Field(ge=1)


class Hotfix(StrictModel):
    rows: int = Field(ge=1)


class Scenario(StrictModel):
    name: str
    description: str = ""
    seed: int = Field(0, ge=0, lt=2**31, description="numpy and pandas take seeds in [0, 2**32); shifts add to it.")
    source: Source
    reference: Reference
    shift: Shift | None = None
    shifts: list[ShiftSpec] | None = Field(None, min_length=1, description="Successive shifts, in order.")
    windows: Windows
    evaluation: Evaluation
    hotfix: Hotfix

    @model_validator(mode="after")
    def _one_form(self) -> "Scenario":
        old = (self.windows.shifted_rows, self.windows.shifted_share, self.windows.labelled_share)
        if self.shifts is not None:
            if self.shift is not None or any(v is not None for v in old):
                raise ValueError("give either shifts: (a list) or the one-shift form (shift: with "
                                 "windows.shifted_rows, shifted_share, labelled_share), not both")
            names = [s.name for s in self.shifts]
            if len(set(names)) != len(names):
                raise ValueError(f"shift names must be unique, got {names}")
        elif self.shift is None or any(v is None for v in old):
            raise ValueError("a scenario needs shifts: (a list), or shift: with windows.shifted_rows, "
                             "shifted_share and labelled_share")
        return self

    def shift_list(self) -> list[ShiftSpec]:
        """The shifts in order; the one-shift form is a one-element list named ``shift``."""
        if self.shifts is not None:
            return list(self.shifts)
        w = self.windows
        return [ShiftSpec(name="shift", groups=self.shift.groups, rows=w.shifted_rows, share=w.shifted_share,
                          labelled_share=w.labelled_share)]


def load_scenario(name_or_path: str | Path) -> tuple[Scenario, Path]:
    path = resolve(name_or_path, SCENARIO_DIR, "scenario")
    return load_yaml_model(Scenario, path), path


def check_source(source: Source, data_dir: Path) -> None:
    """Raise the error ``load_source`` would for a data set that is not there, without reading it."""
    if source.kind == "clinc150":
        data.clinc150_files(Path(source.path) if source.path else data_dir)
    elif source.kind == "file" and source.path:
        data.existing_file(Path(source.path))


def load_source(source: Source, data_dir: Path) -> pd.DataFrame:
    if source.kind == "clinc150":
        return data.load_clinc150(Path(source.path) if source.path else data_dir)
    if source.kind == "hub":
        return data.load_hub_clinc()
    if not source.path:
        raise RefitError("scenario source kind 'file' needs a path")
    return data.load_table(Path(source.path), source.text_column, source.label_column,
                           source.split_column, source.group_column)


@dataclass(frozen=True)
class ShiftData:
    """One shift's traffic window and its test texts (the report's ``external`` accuracy, never a gate's)."""

    name: str
    groups: list[str]
    window: pd.DataFrame
    external: pd.DataFrame
    labelled_share: float
    windows: int = 1
    label_delay_windows: int = 0
    labelling: str = "all"
    label_budget_per_window: int = 40

    def parts(self) -> list[pd.DataFrame]:
        """The shift's traffic cut into its ``windows`` windows, in order, as even as the rows allow."""
        bounds = np.linspace(0, len(self.window), self.windows + 1).round().astype(int)
        return [self.window.iloc[a:b].reset_index(drop=True) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class ScenarioData:
    """Everything a scenario provides, as frames with ``text``, ``label`` and ``group``.

    ``labels`` are the labels v1 learns (reference and sparse groups); a
    shift to groups v1 never saw brings labels beyond them.
    """

    labels: list[str]
    train: pd.DataFrame
    golden: pd.DataFrame
    no_drift_window: pd.DataFrame
    shifts: list[ShiftData]
    hotfix: pd.DataFrame

    @property
    def shifted_window(self) -> pd.DataFrame:
        return self.shifts[0].window

    @property
    def shifted_eval(self) -> pd.DataFrame:
        return self.shifts[0].external


def _sample(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    if len(frame) <= n:
        return frame
    return frame.iloc[np.sort(rng.choice(len(frame), n, replace=False))]


def _per_label(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """At most ``n`` rows of each label."""
    if frame.empty or n == 0:
        return frame.iloc[:0]
    return pd.concat([_sample(part, n, rng) for _, part in frame.groupby("label", sort=True)])


def _cycle(frame: pd.DataFrame, start: int, n: int) -> pd.DataFrame:
    """``n`` rows from ``start`` on, wrapping around: steady traffic repeats once the pool is used up."""
    if n == 0 or frame.empty:
        return frame.iloc[:0]
    return frame.iloc[[(start + i) % len(frame) for i in range(n)]]


def build(scenario: Scenario, frame: pd.DataFrame) -> ScenarioData:
    """Cut the scenario's frames out of the loaded data, deterministically."""
    known = set(frame["group"])
    shifts = scenario.shift_list()
    sparse_groups = (scenario.reference.sparse_groups if scenario.reference.sparse_groups is not None
                     else sorted(known - set(scenario.reference.groups)))
    named = [("reference.groups", scenario.reference.groups), ("reference.sparse_groups", sparse_groups)]
    named += [(f"shift {s.name}: groups", s.groups) for s in shifts]
    for name, groups in named:
        missing = sorted(set(groups) - known)
        if missing:
            raise RefitError(f"scenario {scenario.name}: {name} names unknown groups {missing}")
    rng = np.random.default_rng(scenario.seed)
    ref = frame["group"].isin(scenario.reference.groups)
    split = frame["split"]

    ref_train = frame[ref & (split == "train")]
    if scenario.reference.max_per_label:
        ref_train = _per_label(ref_train, scenario.reference.max_per_label, rng)
    sparse_pool = frame[frame["group"].isin(sparse_groups) & ~ref & (split == "train")]
    sparse = _per_label(sparse_pool, scenario.reference.sparse_per_label, rng)
    train = pd.concat([ref_train, sparse])

    w = scenario.windows
    ref_val = frame[ref & (split == "val")].sample(frac=1.0, random_state=scenario.seed)
    used = set(sparse.index)
    e = scenario.evaluation
    golden = data.stratified_sample(frame[ref & (split == "test")], e.golden_max_rows, rng)
    # The quiet window comes from the collection the reference does (the golden suite's split, less the golden
    # texts), topped up from validation: CLINC150's splits are phrased differently enough for a self-calibrated
    # text signal to tell one from the other, as production traffic of a stable model would not.
    same_split = frame[ref & (split == "test")].drop(golden.index).sample(frac=1.0, random_state=scenario.seed)
    same_split = same_split[~same_split["text"].map(data.text_hash).isin(data.text_hashes(golden["text"]))]
    no_drift = pd.concat([same_split, ref_val]).iloc[: w.no_drift_rows]
    steady_at = max(0, w.no_drift_rows - len(same_split))
    externals = [data.stratified_sample(frame[frame["group"].isin(spec.groups) & (split == "test")],
                                        e.shifted_max_rows, rng) for spec in shifts]
    # A text that also sits in the test split (CLINC150 repeats a few) is never trained on or served.
    evaluated = data.text_hashes(pd.concat([golden, *externals])["text"])
    unseen = ~frame["text"].map(data.text_hash).isin(evaluated)
    train = train[unseen.loc[train.index]]
    shift_data, pools = [], []
    for k, (spec, external) in enumerate(zip(shifts, externals)):
        n_shift = round(spec.rows * spec.share)
        in_groups = frame["group"].isin(spec.groups)
        pool = frame[in_groups & (split == "train") & unseen].drop(list(used), errors="ignore")
        pool = pool.sample(frac=1.0, random_state=scenario.seed + k)
        shifted_part = pool.iloc[:n_shift]
        used |= set(shifted_part.index)
        steady_part = _cycle(ref_val, steady_at, spec.rows - len(shifted_part))
        steady_at += len(steady_part)
        window = pd.concat([shifted_part, steady_part]).sample(frac=1.0, random_state=scenario.seed + 1 + k)
        shift_data.append((spec, window, external))
        pools.append(pool.iloc[n_shift:])

    hotfix = pools[0].iloc[: scenario.hotfix.rows]
    keep = ["text", "label", "group"]

    def tidy(part: pd.DataFrame) -> pd.DataFrame:
        return part[keep].reset_index(drop=True)

    return ScenarioData(
        labels=sorted(train["label"].unique()),
        train=tidy(train),
        golden=tidy(golden),
        no_drift_window=tidy(no_drift),
        shifts=[ShiftData(spec.name, list(spec.groups), tidy(window), tidy(external), spec.labelled_share,
                          spec.windows, spec.label_delay_windows, spec.labelling, spec.label_budget_per_window)
                for spec, window, external in shift_data],
        hotfix=tidy(hotfix),
    )


def poison(frame: pd.DataFrame, labels: list[str], seed: int) -> pd.DataFrame:
    """Every label replaced by a different one: a hotfix file gone wrong."""
    if len(set(labels)) < 2:
        raise RefitError("poisoning needs at least two labels")
    rng = np.random.default_rng(seed)
    out = frame.copy()
    choices = np.array(labels)
    wrong = []
    for label in out["label"]:
        pick = label
        while pick == label:
            pick = str(choices[rng.integers(len(choices))])
        wrong.append(pick)
    out["label"] = wrong
    return out


class Labellers:
    """The scenario's simulated labelling process: which served requests get a label, and when it arrives.

    It knows each served request's true label (the scenario's), and hands
    labels out as production would: a share of a window's requests, or only
    the requests refit asked for, each arriving some windows later. It may
    write labels; it never decides anything.
    """

    def __init__(self) -> None:
        self._truth: dict[str, str] = {}
        self._shift_of: dict[str, str] = {}
        self._due: dict[int, list[str]] = {}
        self.arrived: dict[str, list[str]] = {}  # shift name -> request ids whose label arrived
        self.requested: dict[str, int] = {}

    def record_served(self, shift: str, served: pd.DataFrame, labels: pd.Series) -> None:
        """Requests of ``shift`` as served (``request_id`` in the window's row order) with their true labels."""
        for request_id, label in zip(served["request_id"], labels):
            self._truth[str(request_id)] = str(label)
            self._shift_of[str(request_id)] = shift

    def label_share(self, served: pd.DataFrame, share: float, seed: int, due: int) -> int:
        """A seeded ``share`` of the served requests gets labelled, arriving at window ``due``."""
        picked = np.random.default_rng(seed).random(len(served)) < share
        return self._schedule([str(i) for i in served["request_id"][picked]], due)

    def ask(self, shift: str, request_ids, due: int) -> int:
        """Refit asked for these; the labellers answer every one they know, arriving at window ``due``."""
        known = [str(i) for i in request_ids if str(i) in self._truth]
        self.requested[shift] = self.requested.get(shift, 0) + len(known)
        return self._schedule(known, due)

    def _schedule(self, ids: list[str], due: int) -> int:
        self._due.setdefault(due, []).extend(ids)
        return len(ids)

    def deliver(self, window: int) -> pd.DataFrame:
        """Labels due at or before ``window`` (request_id, label, source), each delivered once."""
        ids = [i for w in sorted(self._due) if w <= window for i in self._due.pop(w)]
        ids = list(dict.fromkeys(ids))
        for i in ids:
            self.arrived.setdefault(self._shift_of[i], []).append(i)
        return pd.DataFrame({"request_id": ids, "label": [self._truth[i] for i in ids],
                             "source": "delayed-feedback"})

    def pending(self) -> int:
        return sum(len(ids) for ids in self._due.values())
