"""Evidently's side of a check: refit's methods registered with it, and its HTML report (the monitor's artifact).

Evidently is imported only here, and only when a check asks for a method
refit does not compute itself or for the report.
"""

from __future__ import annotations

import warnings
from functools import cache

import pandas as pd

from tasks.drift.policy import EMBEDDING_NOVELTY, LABEL_SHIFT, NOVELTY, DriftPolicy
from tasks.drift.prediction import label_shift
from tasks.drift.text import embedding_novelty, novelty_share


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


def _titled(report_html: str) -> str:
    """Give Evidently's page a title, so a report downloaded from MLflow says what made it."""
    from evidently import __version__

    title = f"<title>refit drift check: Evidently {__version__} report</title>"
    if "<head>" in report_html:
        return report_html.replace("<head>", f"<head>\n    {title}", 1)
    return title + report_html
