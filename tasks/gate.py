"""Gate: decide whether a challenger may replace the champion.

Improvement is judged on ``fresh``, the held-out part of the update's own
new labels (the drift that happened); non-regression on ``golden``, the
suite that grows with every promotion, overall and per slice. Every rule in the gate policy is evaluated and reported, passed or not, with
its value and limit, so a refused update says which rule refused it and by
how much. The verdict is a value, never a bare bool.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefect import task
from pydantic import Field

from refit.policy import StrictModel, chosen_policy, load_policy
from refit.verdict import Rule, RuleVerdict, at_least, at_most, html_page, html_table, markdown_table, ratio
from tasks.evaluate import Evaluation

FRESH, GOLDEN = "fresh", "golden"  # the update's held-out new labels; the regression suite


class GatePolicy(StrictModel):
    """Quality and cost rules a challenger must pass to be promoted."""

    min_fresh_improvement: float = Field(
        description="Accuracy gain on the fresh holdout (the update's own held-out labels), in fractions.")
    require_significant_improvement: bool = Field(
        False, description="Also require the lower confidence bound of the fresh gain to be above zero.")
    max_golden_regression: float = Field(ge=0, description="Accuracy the golden suite may lose, in fractions.")
    max_slice_regression: float | None = Field(
        None, ge=0, description="Accuracy any one golden slice (a group) may lose; None turns the rule off.")
    min_slice_rows: int = Field(20, ge=1, description="Smaller slices are reported but not judged.")
    max_update_cost_usd: float = Field(gt=0, description="Ceiling on the price of this one update.")
    max_inference_cost_ratio: float = Field(gt=0, description="Challenger / champion cost per 1,000 predictions.")
    max_latency_p95_ratio: float | None = Field(None, gt=0, description="Challenger / champion p95 latency.")
    confidence_level: float = Field(0.95, gt=0, lt=1, description="Of the paired-bootstrap intervals.")
    bootstrap_samples: int = Field(1000, ge=100)


def load_gate_policy(name_or_path: str = "gate") -> tuple[GatePolicy, Path]:
    return load_policy(GatePolicy, name_or_path)


def chosen_gate_policy(requested: str | None, settings) -> str:
    """The gate policy a run uses: a name in ``refit/policies/``, or the file pinned by ``REFIT_GATE_POLICY``."""
    return chosen_policy(requested, settings.gate_policy, "gate", "REFIT_GATE_POLICY")


@dataclass(frozen=True)
class Verdict(RuleVerdict):
    """The gate's decision: every rule with its value, limit and result, and the labels the challenger learned."""

    labels_learned: tuple[str, ...] = ()  # labels the champion did not know that the challenger answers

    PASSED = "promote: all rules passed"
    REFUSED = "refuse"

    def to_dict(self) -> dict:
        return {"passed": self.passed, "summary": self.summary, "labels_learned": list(self.labels_learned),
                "rules": self.rule_dicts()}

    @property
    def learned_line(self) -> str:
        if not self.labels_learned:
            return "New labels: none."
        return f"New labels ({len(self.labels_learned)}): {', '.join(self.labels_learned)}."

    def markdown(self) -> str:
        return f"**Gate verdict: {self.summary}**\n\n{markdown_table(self.rules)}\n{self.learned_line}\n"

    def html(self, title: str) -> str:
        import html

        return html_page(title, self.summary, html_table(self.rules) + f"<p>{html.escape(self.learned_line)}</p>")


def paired_bootstrap(before: np.ndarray, after: np.ndarray, samples: int, level: float,
                     seed: int = 0) -> tuple[float, float]:
    """Interval of mean(after - before) over the same examples, by resampling examples."""
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    if len(diff) == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return (round(float(np.percentile(means, tail)), 6), round(float(np.percentile(means, 100 - tail)), 6))


def _interval(champion: Evaluation, challenger: Evaluation, name: str, policy: GatePolicy,
              sign: float = 1.0) -> tuple[float, float] | None:
    """Paired interval of the challenger's gain (sign 1) or loss (sign -1) on set ``name``."""
    before, after = champion.correct.get(name), challenger.correct.get(name)
    if before is None or after is None or len(before) != len(after):
        return None
    low, high = paired_bootstrap(before, after, policy.bootstrap_samples, policy.confidence_level)
    return (low, high) if sign > 0 else (-high, -low)


def decide(champion: Evaluation, challenger: Evaluation, update_cost_usd: float, policy: GatePolicy,
           budget_left_usd: float | None = None, labels_learned: tuple[str, ...] = ()) -> Verdict:
    """Apply every rule of ``policy`` to the two evaluations and the update's cost.

    ``budget_left_usd``: what this month's budget had left before the update;
    when given, the update's price must fit in it.
    """
    fresh_gain = challenger.slices[FRESH].accuracy - champion.slices[FRESH].accuracy
    golden_loss = champion.slices[GOLDEN].accuracy - challenger.slices[GOLDEN].accuracy
    gain_ci = _interval(champion, challenger, FRESH, policy)
    rules = [at_least("fresh_accuracy_gain", fresh_gain, policy.min_fresh_improvement, gain_ci)]
    if policy.require_significant_improvement:
        low = gain_ci[0] if gain_ci else float("-inf")
        rules.append(Rule("fresh_gain_lower_bound", round(low, 6), 0.0, ">", low > 0, *(gain_ci or (None, None))))
    rules.append(at_most("golden_accuracy_loss", golden_loss, policy.max_golden_regression,
                          _interval(champion, challenger, "golden", policy, sign=-1)))
    if policy.max_slice_regression is not None:
        losses = {name: champion.groups[name].accuracy - m.accuracy for name, m in challenger.groups.items()
                  if name.startswith(f"{GOLDEN}/") and name in champion.groups and m.rows >= policy.min_slice_rows}
        if losses:
            worst = max(losses, key=losses.get)
            rules.append(at_most(f"worst_slice_loss ({worst})", losses[worst], policy.max_slice_regression))
    rules.append(at_most("update_cost_usd", update_cost_usd, policy.max_update_cost_usd))
    if budget_left_usd is not None:
        rules.append(at_most("update_cost_vs_budget_left_usd", update_cost_usd, round(budget_left_usd, 6)))
    rules.append(at_most("inference_cost_ratio", ratio(challenger.cost_per_1k_usd, champion.cost_per_1k_usd),
                          policy.max_inference_cost_ratio))
    if policy.max_latency_p95_ratio is not None:
        rules.append(at_most("latency_p95_ratio", ratio(challenger.latency_ms_p95, champion.latency_ms_p95),
                              policy.max_latency_p95_ratio))
    return Verdict(all(r.passed for r in rules), rules, tuple(labels_learned))


@task(name="gate")
def gate(champion: Evaluation, challenger: Evaluation, update_cost_usd: float, policy: GatePolicy,
         budget_left_usd: float | None = None, labels_learned: tuple[str, ...] = ()) -> Verdict:
    return decide(champion, challenger, update_cost_usd, policy, budget_left_usd, labels_learned)
