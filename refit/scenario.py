"""Scenarios: a data set, what the champion knows, and how traffic shifts.

A scenario is a small YAML file (``refit/scenarios/clinc-shift.yaml`` is the
default, documented field by field). ``build`` turns it into the concrete
frames every flow uses, deterministically for its seed: the champion's
training data, the golden and shifted evaluation sets (never trained on),
two traffic windows, the delayed labels, and a poisoned hotfix file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

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
    max_per_label: int | None = Field(None, ge=1)
    sparse_per_label: int = Field(5, ge=0)


class Shift(StrictModel):
    groups: list[str]


class Windows(StrictModel):
    no_drift_rows: int = Field(ge=1)
    shifted_rows: int = Field(ge=1)
    shifted_share: float = Field(gt=0, le=1)
    labelled_share: float = Field(gt=0, le=1)


class Evaluation(StrictModel):
    golden_max_rows: int = Field(ge=1)
    shifted_max_rows: int = Field(ge=1)


class Hotfix(StrictModel):
    rows: int = Field(ge=1)


class Scenario(StrictModel):
    name: str
    description: str = ""
    seed: int = 0
    source: Source
    reference: Reference
    shift: Shift
    windows: Windows
    evaluation: Evaluation
    hotfix: Hotfix


def load_scenario(name_or_path: str | Path) -> tuple[Scenario, Path]:
    path = resolve(name_or_path, SCENARIO_DIR)
    return load_yaml_model(Scenario, path), path


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
class ScenarioData:
    """Everything a scenario provides, as frames with ``text`` and ``label``."""

    labels: list[str]
    train: pd.DataFrame
    golden: pd.DataFrame
    shifted_eval: pd.DataFrame
    no_drift_window: pd.DataFrame
    shifted_window: pd.DataFrame
    hotfix: pd.DataFrame


def _sample(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    if len(frame) <= n:
        return frame
    return frame.iloc[np.sort(rng.choice(len(frame), n, replace=False))]


def _per_label(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """At most ``n`` rows of each label."""
    return pd.concat([_sample(part, n, rng) for _, part in frame.groupby("label", sort=True)])


def build(scenario: Scenario, frame: pd.DataFrame) -> ScenarioData:
    """Cut the scenario's frames out of the loaded data, deterministically."""
    known = set(frame["group"])
    for name, groups in (("reference.groups", scenario.reference.groups), ("shift.groups", scenario.shift.groups)):
        missing = sorted(set(groups) - known)
        if missing:
            raise RefitError(f"scenario {scenario.name}: {name} names unknown groups {missing}")
    rng = np.random.default_rng(scenario.seed)
    ref = frame["group"].isin(scenario.reference.groups)
    shifted = frame["group"].isin(scenario.shift.groups)
    split = frame["split"]

    ref_train = frame[ref & (split == "train")]
    if scenario.reference.max_per_label:
        ref_train = _per_label(ref_train, scenario.reference.max_per_label, rng)
    sparse_pool = frame[~ref & (split == "train")]
    sparse = _per_label(sparse_pool, scenario.reference.sparse_per_label, rng)
    train = pd.concat([ref_train, sparse])

    w = scenario.windows
    ref_val = frame[ref & (split == "val")].sample(frac=1.0, random_state=scenario.seed)
    no_drift = ref_val.iloc[: w.no_drift_rows]
    n_shift = round(w.shifted_rows * w.shifted_share)
    shift_pool = frame[shifted & (split == "train")].drop(sparse.index, errors="ignore")
    shift_pool = shift_pool.sample(frac=1.0, random_state=scenario.seed)
    shifted_part = shift_pool.iloc[:n_shift]
    steady_part = ref_val.iloc[w.no_drift_rows : w.no_drift_rows + (w.shifted_rows - n_shift)]
    shifted_window = pd.concat([shifted_part, steady_part]).sample(frac=1.0, random_state=scenario.seed + 1)

    hotfix = shift_pool.iloc[n_shift : n_shift + scenario.hotfix.rows]

    e = scenario.evaluation
    golden = data.stratified_sample(frame[ref & (split == "test")], e.golden_max_rows, rng)
    shifted_eval = data.stratified_sample(frame[shifted & (split == "test")], e.shifted_max_rows, rng)
    keep = ["text", "label", "group"]
    return ScenarioData(
        labels=sorted(frame["label"].unique()),
        train=train[keep].reset_index(drop=True),
        golden=golden[keep].reset_index(drop=True),
        shifted_eval=shifted_eval[keep].reset_index(drop=True),
        no_drift_window=no_drift[keep].reset_index(drop=True),
        shifted_window=shifted_window[keep].reset_index(drop=True),
        hotfix=hotfix[keep].reset_index(drop=True),
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
