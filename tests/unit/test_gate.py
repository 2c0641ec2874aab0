"""The promotion gate: every rule evaluated and reported, a verdict with reasons."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluate import Evaluation, SliceMetrics
from tasks.gate import GatePolicy, Verdict, decide, gate, load_gate_policy, paired_bootstrap

POLICY = GatePolicy(min_fresh_improvement=0.05, max_golden_regression=0.02,
                    max_update_cost_usd=0.50, max_inference_cost_ratio=1.5)
RULES = ["fresh_accuracy_gain", "golden_accuracy_loss", "update_cost_usd", "inference_cost_ratio"]


def evaluation(golden: float, fresh: float, cost_per_1k: float = 0.001) -> Evaluation:
    return Evaluation(
        slices={"golden": SliceMetrics(400, golden, golden, 0.8), "fresh": SliceMetrics(400, fresh, fresh, 0.7)},
        cpu_seconds_per_1k=cost_per_1k / 0.048 * 3600,
        cost_per_1k_usd=cost_per_1k,
    )


CHAMPION = evaluation(golden=0.90, fresh=0.40)


def rule(verdict: Verdict, name: str):
    return next(r for r in verdict.rules if r.name == name)


def test_shipped_gate_policy_loads():
    policy, path = load_gate_policy()
    assert path.name == "gate.yaml"
    assert policy.model_dump(include=set(POLICY.model_fields_set)) == POLICY.model_dump(exclude_unset=True)
    assert policy.require_significant_improvement and policy.max_slice_regression is not None
    assert policy.max_latency_p95_ratio is not None


def test_passes_when_every_rule_passes():
    verdict = decide(CHAMPION, evaluation(golden=0.895, fresh=0.60), 0.10, POLICY)
    assert verdict.passed
    assert [r.name for r in verdict.rules] == RULES
    assert all(r.passed for r in verdict.rules) and verdict.failed == []
    assert verdict.summary == "promote: all rules passed"
    assert rule(verdict, "fresh_accuracy_gain").value == pytest.approx(0.20)
    assert rule(verdict, "golden_accuracy_loss").value == pytest.approx(0.005)
    assert rule(verdict, "inference_cost_ratio").value == pytest.approx(1.0)


def test_golden_regression_beyond_limit_fails_and_is_named():
    verdict = decide(CHAMPION, evaluation(golden=0.85, fresh=0.70), 0.10, POLICY)
    assert not verdict.passed
    assert [r.name for r in verdict.failed] == ["golden_accuracy_loss"]
    assert verdict.summary.startswith("refuse: ")
    assert "golden_accuracy_loss failed: +0.0500 (must be <= +0.0200)" in verdict.summary
    assert "fresh_accuracy_gain" not in verdict.summary  # passed rules are not reasons


def test_too_small_improvement_fails():
    verdict = decide(CHAMPION, evaluation(golden=0.90, fresh=0.42), 0.10, POLICY)
    assert [r.name for r in verdict.failed] == ["fresh_accuracy_gain"]
    assert "+0.0200 (must be >= +0.0500)" in verdict.summary


def test_too_costly_update_fails():
    verdict = decide(CHAMPION, evaluation(golden=0.90, fresh=0.70), 0.75, POLICY)
    assert not verdict.passed
    assert [r.name for r in verdict.failed] == ["update_cost_usd"]
    assert "update_cost_usd failed: +0.7500 (must be <= +0.5000)" in verdict.summary


def test_inference_cost_ratio_rule():
    pricier = decide(CHAMPION, evaluation(golden=0.90, fresh=0.70, cost_per_1k=0.002), 0.10, POLICY)
    assert [r.name for r in pricier.failed] == ["inference_cost_ratio"]
    assert rule(pricier, "inference_cost_ratio").value == pytest.approx(2.0)
    affordable = decide(CHAMPION, evaluation(golden=0.90, fresh=0.70, cost_per_1k=0.0014), 0.10, POLICY)
    assert affordable.passed and rule(affordable, "inference_cost_ratio").value == pytest.approx(1.4)
    free_champion = evaluation(golden=0.90, fresh=0.40, cost_per_1k=0.0)
    # A champion measured at zero cost: a challenger that costs anything is infinitely dearer, and refused
    # (it passed before, while the rollout guards called the same ratio infinite); two zeros are equal.
    dearer = decide(free_champion, evaluation(golden=0.90, fresh=0.70), 0.10, POLICY)
    assert not rule(dearer, "inference_cost_ratio").passed
    assert rule(dearer, "inference_cost_ratio").value == float("inf")
    both_free = decide(free_champion, evaluation(golden=0.90, fresh=0.70, cost_per_1k=0.0), 0.10, POLICY)
    assert rule(both_free, "inference_cost_ratio").passed


def test_several_failures_are_all_reported():
    verdict = decide(CHAMPION, evaluation(golden=0.80, fresh=0.40, cost_per_1k=0.01), 9.0, POLICY)
    assert [r.name for r in verdict.failed] == RULES
    for name in RULES:
        assert f"{name} failed" in verdict.summary


def test_value_exactly_at_the_limit_passes():
    at_limit = decide(evaluation(golden=0.90, fresh=0.10), evaluation(golden=0.88, fresh=0.15), 0.10, POLICY)
    assert at_limit.passed, at_limit.summary


def test_reports_contain_every_rule():
    verdict = decide(CHAMPION, evaluation(golden=0.85, fresh=0.70), 0.10, POLICY)
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
    verdict = gate.fn(CHAMPION, evaluation(golden=0.90, fresh=0.70), 0.10, POLICY)
    assert isinstance(verdict, Verdict) and verdict.passed
    assert verdict == decide(CHAMPION, evaluation(golden=0.90, fresh=0.70), 0.10, POLICY)


# --- Per-example, per-slice, latency and budget rules -------------------------------------------


def hits(n: int, accuracy: float, seed: int) -> np.ndarray:
    """``n`` examples, ``round(n * accuracy)`` of them right, in a seeded order."""
    out = np.zeros(n)
    out[: round(n * accuracy)] = 1
    return np.random.default_rng(seed).permutation(out)


def measured(golden: np.ndarray, fresh: np.ndarray, groups: dict[str, float] | None = None,
             latency_p95: float = 10.0, cost_per_1k: float = 0.001) -> Evaluation:
    """An evaluation whose set accuracies come from per-example hits, as ``tasks.evaluate`` makes them."""
    slices = {"golden": SliceMetrics(len(golden), float(golden.mean()), 0.0, 0.8),
              "fresh": SliceMetrics(len(fresh), float(fresh.mean()), 0.0, 0.7)}
    return Evaluation(slices, cpu_seconds_per_1k=cost_per_1k / 0.048 * 3600, cost_per_1k_usd=cost_per_1k,
                      groups={name: SliceMetrics(100, acc, acc, 0.8) for name, acc in (groups or {}).items()},
                      correct={"golden": golden, "fresh": fresh}, latency_ms_p50=latency_p95 / 2,
                      latency_ms_p95=latency_p95)


FULL = GatePolicy(min_fresh_improvement=0.05, require_significant_improvement=True, max_golden_regression=0.02,
                  max_slice_regression=0.10, max_update_cost_usd=0.50, max_inference_cost_ratio=1.5,
                  max_latency_p95_ratio=1.5)


def test_paired_bootstrap_interval_holds_the_mean_difference_and_is_repeatable():
    before, after = hits(1000, 0.60, 1), hits(1000, 0.70, 2)
    low, high = paired_bootstrap(before, after, samples=1000, level=0.95)
    assert low < 0.10 < high
    assert 0.04 < low and high < 0.16  # about ±2 standard errors of a difference of two 1,000-row shares
    assert (low, high) == paired_bootstrap(before, after, samples=1000, level=0.95)
    assert paired_bootstrap(before, before, samples=1000, level=0.95) == (0.0, 0.0)  # identical models


def test_gain_that_could_be_noise_is_refused_when_policy_requires_significance():
    champion = measured(hits(400, 0.90, 0), hits(40, 0.50, 1))
    # 6 more right answers of 40 clears the 5-point minimum, but 40 examples cannot tell it from luck
    lucky = measured(hits(400, 0.90, 0), np.where(np.arange(40) < 6, 1.0, champion.correct["fresh"]))
    verdict = decide(champion, lucky, 0.10, FULL)
    gain = rule(verdict, "fresh_accuracy_gain")
    assert gain.passed and gain.ci_low is not None and gain.ci_low <= gain.value <= gain.ci_high
    bound = rule(verdict, "fresh_gain_lower_bound")
    assert not bound.passed and not verdict.passed
    assert "fresh_gain_lower_bound failed" in verdict.summary
    relaxed = decide(champion, lucky, 0.10, FULL.model_copy(update={"require_significant_improvement": False}))
    assert relaxed.passed, relaxed.summary


def test_poisoned_update_is_refused_by_golden_and_slice_rules():
    groups = {"golden/banking": 0.95, "golden/home": 0.90, "fresh/ungrouped": 0.40}
    champion = measured(hits(1000, 0.90, 0), hits(1000, 0.40, 1), groups)
    # Better on the fresh holdout, but it unlearned banking: golden falls and one slice collapses.
    poisoned = measured(hits(1000, 0.80, 2), hits(1000, 0.60, 3),
                        {"golden/banking": 0.30, "golden/home": 0.90, "fresh/ungrouped": 0.70})
    verdict = decide(champion, poisoned, 0.10, FULL)
    failed = [r.name for r in verdict.failed]
    assert failed == ["golden_accuracy_loss", "worst_slice_loss (golden/banking)"]
    assert rule(verdict, "worst_slice_loss (golden/banking)").value == pytest.approx(0.65)
    golden = rule(verdict, "golden_accuracy_loss")
    assert golden.ci_low > 0.02  # the loss is real, not noise: its whole interval is past the limit


def test_small_slices_are_not_judged():
    champion = measured(hits(1000, 0.90, 0), hits(1000, 0.40, 1), {"golden/tiny": 0.9})
    challenger = measured(hits(1000, 0.90, 0), hits(1000, 0.60, 1), {"golden/tiny": 0.1})
    challenger.groups["golden/tiny"] = SliceMetrics(5, 0.1, 0.1, 0.5)
    verdict = decide(champion, challenger, 0.10, FULL)
    assert verdict.passed and not any(r.name.startswith("worst_slice_loss") for r in verdict.rules)


def test_better_but_too_costly_challenger_is_refused():
    champion = measured(hits(1000, 0.90, 0), hits(1000, 0.40, 1), latency_p95=10.0, cost_per_1k=0.001)
    better = dict(golden=hits(1000, 0.91, 2), fresh=hits(1000, 0.80, 3))
    slow = decide(champion, measured(**better, latency_p95=25.0), 0.10, FULL)
    assert [r.name for r in slow.failed] == ["latency_p95_ratio"]
    assert rule(slow, "latency_p95_ratio").value == pytest.approx(2.5)
    pricey = decide(champion, measured(**better, cost_per_1k=0.003), 0.10, FULL)
    assert [r.name for r in pricey.failed] == ["inference_cost_ratio"]
    over_budget = decide(champion, measured(**better), 0.10, FULL, budget_left_usd=0.05)
    assert [r.name for r in over_budget.failed] == ["update_cost_vs_budget_left_usd"]
    assert decide(champion, measured(**better), 0.10, FULL, budget_left_usd=0.50).passed


def test_interval_is_shown_in_every_report():
    champion = measured(hits(1000, 0.90, 0), hits(1000, 0.40, 1))
    challenger = measured(hits(1000, 0.90, 2), hits(1000, 0.70, 3))
    verdict = decide(champion, challenger, 0.10, FULL)
    gain = rule(verdict, "fresh_accuracy_gain")
    # The gate's interval is the seeded paired bootstrap of these very hits, so it is one exact string.
    low, high = paired_bootstrap(champion.correct["fresh"], challenger.correct["fresh"], FULL.bootstrap_samples,
                                 FULL.confidence_level)
    assert (gain.ci_low, gain.ci_high) == (low, high)
    assert gain.interval == f"[{low:+.4f}, {high:+.4f}]"
    assert low < 0.30 < high and high - low < 0.12  # around the true gain, about ±2 standard errors
    assert gain.interval in verdict.markdown() and gain.interval in verdict.html("g")
