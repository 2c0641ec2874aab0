"""The promotion gate: every rule evaluated and reported, a verdict with reasons."""

from __future__ import annotations

import pytest

from tasks.evaluate import Evaluation, SliceMetrics
from tasks.gate import GatePolicy, Verdict, decide, gate, load_gate_policy

POLICY = GatePolicy(min_shifted_improvement=0.05, max_golden_regression=0.02,
                    max_update_cost_usd=0.50, max_inference_cost_ratio=1.5)
RULES = ["shifted_accuracy_gain", "golden_accuracy_loss", "update_cost_usd", "inference_cost_ratio"]


def evaluation(golden: float, shifted: float, cost_per_1k: float = 0.001) -> Evaluation:
    return Evaluation(
        slices={"golden": SliceMetrics(400, golden, golden, 0.8), "shifted": SliceMetrics(400, shifted, shifted, 0.7)},
        cpu_seconds_per_1k=cost_per_1k / 0.048 * 3600,
        cost_per_1k_usd=cost_per_1k,
    )


CHAMPION = evaluation(golden=0.90, shifted=0.40)


def rule(verdict: Verdict, name: str):
    return next(r for r in verdict.rules if r.name == name)


def test_shipped_gate_policy_loads():
    policy, path = load_gate_policy()
    assert path.name == "gate.yaml"
    assert policy == POLICY


def test_passes_when_every_rule_passes():
    verdict = decide(CHAMPION, evaluation(golden=0.895, shifted=0.60), 0.10, POLICY)
    assert verdict.passed
    assert [r.name for r in verdict.rules] == RULES
    assert all(r.passed for r in verdict.rules) and verdict.failed == []
    assert verdict.summary == "promote: all rules passed"
    assert rule(verdict, "shifted_accuracy_gain").value == pytest.approx(0.20)
    assert rule(verdict, "golden_accuracy_loss").value == pytest.approx(0.005)
    assert rule(verdict, "inference_cost_ratio").value == pytest.approx(1.0)


def test_golden_regression_beyond_limit_fails_and_is_named():
    verdict = decide(CHAMPION, evaluation(golden=0.85, shifted=0.70), 0.10, POLICY)
    assert not verdict.passed
    assert [r.name for r in verdict.failed] == ["golden_accuracy_loss"]
    assert verdict.summary.startswith("refuse: ")
    assert "golden_accuracy_loss failed: +0.0500 (must be <= +0.0200)" in verdict.summary
    assert "shifted_accuracy_gain" not in verdict.summary  # passed rules are not reasons


def test_too_small_improvement_fails():
    verdict = decide(CHAMPION, evaluation(golden=0.90, shifted=0.42), 0.10, POLICY)
    assert [r.name for r in verdict.failed] == ["shifted_accuracy_gain"]
    assert "+0.0200 (must be >= +0.0500)" in verdict.summary


def test_too_costly_update_fails():
    verdict = decide(CHAMPION, evaluation(golden=0.90, shifted=0.70), 0.75, POLICY)
    assert not verdict.passed
    assert [r.name for r in verdict.failed] == ["update_cost_usd"]
    assert "update_cost_usd failed: +0.7500 (must be <= +0.5000)" in verdict.summary


def test_inference_cost_ratio_rule():
    pricier = decide(CHAMPION, evaluation(golden=0.90, shifted=0.70, cost_per_1k=0.002), 0.10, POLICY)
    assert [r.name for r in pricier.failed] == ["inference_cost_ratio"]
    assert rule(pricier, "inference_cost_ratio").value == pytest.approx(2.0)
    affordable = decide(CHAMPION, evaluation(golden=0.90, shifted=0.70, cost_per_1k=0.0014), 0.10, POLICY)
    assert affordable.passed and rule(affordable, "inference_cost_ratio").value == pytest.approx(1.4)
    free_champion = evaluation(golden=0.90, shifted=0.40, cost_per_1k=0.0)
    unmeasured = decide(free_champion, evaluation(golden=0.90, shifted=0.70), 0.10, POLICY)
    assert rule(unmeasured, "inference_cost_ratio").passed  # no division by zero


def test_several_failures_are_all_reported():
    verdict = decide(CHAMPION, evaluation(golden=0.80, shifted=0.40, cost_per_1k=0.01), 9.0, POLICY)
    assert [r.name for r in verdict.failed] == RULES
    for name in RULES:
        assert f"{name} failed" in verdict.summary


def test_value_exactly_at_the_limit_passes():
    at_limit = decide(evaluation(golden=0.90, shifted=0.10), evaluation(golden=0.88, shifted=0.15), 0.10, POLICY)
    assert at_limit.passed, at_limit.summary


def test_reports_contain_every_rule():
    verdict = decide(CHAMPION, evaluation(golden=0.85, shifted=0.70), 0.10, POLICY)
    as_dict = verdict.to_dict()
    assert as_dict["passed"] is False and as_dict["summary"] == verdict.summary
    assert [r["name"] for r in as_dict["rules"]] == RULES
    assert all({"value", "limit", "comparison", "passed", "sentence"} <= set(r) for r in as_dict["rules"])
    markdown = verdict.markdown()
    html = verdict.html("Gate <v2>")
    for name in RULES:
        assert f"| {name} |" in markdown
        assert f"<td>{name}</td>" in html
    assert markdown.count("**FAIL**") == 1 and markdown.count("| pass |") == 3
    assert "Gate &lt;v2&gt;" in html and "<v2>" not in html
    assert html.count(">FAIL<") == 1


def test_prefect_task_plain_function():
    verdict = gate.fn(CHAMPION, evaluation(golden=0.90, shifted=0.70), 0.10, POLICY)
    assert isinstance(verdict, Verdict) and verdict.passed
    assert verdict == decide(CHAMPION, evaluation(golden=0.90, shifted=0.70), 0.10, POLICY)
