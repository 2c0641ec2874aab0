"""refit report: the cost page adds up to the MLflow ledger and the request log (a real MLflow in tmp_path)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import mlflow
import pandas as pd
import pytest

from refit import requestlog
from tasks.report import SECONDS_PER_MONTH, cost_report
from refit.store import LocalStore

MODEL = "m"


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    from refit.settings import Settings
    from registry import versions
    from registry.tracking import RUN_TYPE, configure

    monkeypatch.setenv("REFIT_HOME", str(tmp_path / "home"))
    experiment_id = configure(Settings())
    for model, cost, verdict in [(MODEL, 0.010, "passed"), (MODEL, 0.020, "refused"), (MODEL, 0.005, "passed"),
                                 ("other", 0.400, "passed")]:
        with mlflow.start_run(experiment_id=experiment_id, tags={RUN_TYPE: "update", "refit.model": model,
                                                                 "refit.gate_verdict": verdict}):
            mlflow.log_metric("update_cost_usd", cost)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        pass
    for _ in range(2):
        version = versions.register(MODEL, run.info.run_id, {})
    versions.set_alias(MODEL, versions.CHAMPION, version)
    versions.set_tags(MODEL, version, {"refit.cascade_verdict": "passed", "refit.cascade_student_share": "0.7",
                                       "refit.cascade_champion_cpu_seconds_per_1k": "10.0",
                                       "refit.cascade_cpu_seconds_per_1k": "4.0"})
    store = LocalStore(tmp_path / "store")
    now = datetime.now(timezone.utc)
    requestlog.write_inference(store, MODEL, pd.DataFrame({
        "request_id": [f"r{i}" for i in range(4)], "timestamp": [now - timedelta(hours=2)] * 4, "text": ["t"] * 4,
        "predicted_label": ["a"] * 4, "confidence": [0.9] * 4, "model_version": [str(version)] * 4,
        "served_by": ["student", "student", "student", "champion"]}))
    return experiment_id, store, version


def test_report_adds_up_to_the_ledger(ledger):
    experiment_id, store, version = ledger
    [page] = cost_report([MODEL], experiment_id, store, cpu_usd_per_hour=0.048, budget_usd=1.0)
    assert page["updates_this_month"] == 3 and page["promoted_this_month"] == 2
    assert page["spend_usd"] == pytest.approx(0.035)  # the other model's update is not this one's spend
    assert page["budget_left_usd"] == pytest.approx(1.0 - 0.035)
    assert page["champion"] == version and page["versions"] == 2
    assert page["cascade"] == "served" and page["student_share_gated"] == 0.7
    assert page["student_share_live"] == pytest.approx(0.75)
    rate = page["requests_per_second"]
    assert rate == pytest.approx(4 / 7200, rel=0.01)
    assert page["monthly_serving_cost_usd"] == pytest.approx(4.0 / 1000 / 3600 * 0.048 * rate * SECONDS_PER_MONTH,
                                                             rel=1e-3)
    logged = mlflow.search_runs([experiment_id], filter_string="tags.`refit.run_type` = 'report'")
    assert len(logged) == 1


def test_a_cascade_that_fell_back_is_priced_as_the_champion_alone(ledger):
    from registry import versions

    experiment_id, store, version = ledger
    versions.set_tags(MODEL, version, {"refit.cascade_fallback": "student share fell"})
    [page] = cost_report([MODEL], experiment_id, store, 0.048, 1.0, log=False)
    assert page["cascade"].startswith("fell back")
    assert page["serving_cost_per_1k_usd"] == pytest.approx(10.0 / 3600 * 0.048, rel=1e-3)


def test_cascade_figures_for_the_demo(ledger):
    from tasks.report import cascade_figures

    _, _, version = ledger
    figures = cascade_figures(MODEL, version)
    assert figures["cascade_served"] and figures["student_share"] == 0.7
    assert figures["cascade_cost_ratio"] is None  # not tagged in this ledger: None, not an error
    assert cascade_figures(MODEL, 1)["cascade_served"] is False  # v1 never had a cascade
