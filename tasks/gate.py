"""Gate: decide whether a challenger may replace the champion.

Every rule in the gate policy is evaluated and reported, passed or not, with
its value and limit, so a refused update says which rule refused it and by
how much. The verdict is a value, never a bare bool.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task
from pydantic import Field

from refit.policy import StrictModel, load_policy
from tasks.evaluate import Evaluation


class GatePolicy(StrictModel):
    """Quality and cost rules a challenger must pass to be promoted."""

    min_shifted_improvement: float = Field(description="Accuracy gain on the shifted set, in fractions.")
    max_golden_regression: float = Field(ge=0, description="Accuracy the golden set may lose, in fractions.")
    max_update_cost_usd: float = Field(gt=0, description="Ceiling on the price of this one update.")
    max_inference_cost_ratio: float = Field(gt=0, description="Challenger / champion cost per 1,000 predictions.")


def load_gate_policy(name_or_path: str = "gate") -> tuple[GatePolicy, Path]:
    return load_policy(GatePolicy, name_or_path)


@dataclass(frozen=True)
class Rule:
    name: str
    value: float
    limit: float
    comparison: str  # ">=" or "<="
    passed: bool

    @property
    def sentence(self) -> str:
        verb = "passed" if self.passed else "failed"
        return f"{self.name} {verb}: {self.value:+.4f} (must be {self.comparison} {self.limit:+.4f})"


@dataclass(frozen=True)
class Verdict:
    passed: bool
    rules: list[Rule]

    @property
    def failed(self) -> list[Rule]:
        return [r for r in self.rules if not r.passed]

    @property
    def summary(self) -> str:
        if self.passed:
            return "promote: all rules passed"
        return "refuse: " + "; ".join(r.sentence for r in self.failed)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "summary": self.summary,
                "rules": [asdict(r) | {"sentence": r.sentence} for r in self.rules]}

    def markdown(self) -> str:
        rows = "\n".join(
            f"| {r.name} | {r.value:+.4f} | {r.comparison} {r.limit:+.4f} | {'pass' if r.passed else '**FAIL**'} |"
            for r in self.rules
        )
        return f"**Gate verdict: {self.summary}**\n\n| rule | value | limit | result |\n|---|---|---|---|\n{rows}\n"

    def html(self, title: str) -> str:
        rows = "".join(
            f"<tr class={'pass' if r.passed else 'fail'}><td>{html.escape(r.name)}</td><td>{r.value:+.4f}</td>"
            f"<td>{r.comparison} {r.limit:+.4f}</td><td>{'pass' if r.passed else 'FAIL'}</td></tr>"
            for r in self.rules
        )
        return (
            f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
            ".pass td:last-child{color:#070}.fail td:last-child{color:#b00;font-weight:bold}</style></head><body>"
            f"<h2>{html.escape(title)}</h2><p><b>{html.escape(self.summary)}</b></p>"
            f"<table><tr><th>rule</th><th>value</th><th>limit</th><th>result</th></tr>{rows}</table></body></html>"
        )


def _at_least(name: str, value: float, limit: float) -> Rule:
    value = round(value, 6)  # 0.90 - 0.88 must meet a 0.02 limit despite float noise
    return Rule(name, value, limit, ">=", value >= limit)


def _at_most(name: str, value: float, limit: float) -> Rule:
    value = round(value, 6)
    return Rule(name, value, limit, "<=", value <= limit)


def decide(champion: Evaluation, challenger: Evaluation, update_cost_usd: float, policy: GatePolicy) -> Verdict:
    """Apply every rule of ``policy`` to the two evaluations and the update's cost."""
    shifted_gain = challenger.slices["shifted"].accuracy - champion.slices["shifted"].accuracy
    golden_loss = champion.slices["golden"].accuracy - challenger.slices["golden"].accuracy
    cost_ratio = challenger.cost_per_1k_usd / champion.cost_per_1k_usd if champion.cost_per_1k_usd else 1.0
    rules = [
        _at_least("shifted_accuracy_gain", shifted_gain, policy.min_shifted_improvement),
        _at_most("golden_accuracy_loss", golden_loss, policy.max_golden_regression),
        _at_most("update_cost_usd", update_cost_usd, policy.max_update_cost_usd),
        _at_most("inference_cost_ratio", cost_ratio, policy.max_inference_cost_ratio),
    ]
    return Verdict(all(r.passed for r in rules), rules)


@task(name="gate")
def gate(champion: Evaluation, challenger: Evaluation, update_cost_usd: float, policy: GatePolicy) -> Verdict:
    return decide(champion, challenger, update_cost_usd, policy)
