"""Rules with a value, a limit and a result: what the promotion gate and the rollout guards report.

Plain data and rendering, no Prefect or MLflow, so the server and the flows
share one shape: every rule says its value, its limit and whether it passed,
and a table of them reads the same in a gate verdict and a guard verdict.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from typing import ClassVar

STYLE = ("body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
         "td,th{border:1px solid #ccc;padding:4px 8px}.pass td:last-child{color:#070}"
         ".fail td:last-child{color:#b00;font-weight:bold}")


@dataclass(frozen=True)
class Rule:
    name: str
    value: float
    limit: float
    comparison: str  # ">=", "<=" or ">"
    passed: bool
    ci_low: float | None = None  # paired-bootstrap interval of value, where it is a difference
    ci_high: float | None = None

    @property
    def interval(self) -> str:
        return "" if self.ci_low is None else f"[{self.ci_low:+.4f}, {self.ci_high:+.4f}]"

    @property
    def sentence(self) -> str:
        verb = "passed" if self.passed else "failed"
        ci = f" {self.interval}" if self.interval else ""
        return f"{self.name} {verb}: {self.value:+.4f}{ci} (must be {self.comparison} {self.limit:+.4f})"


@dataclass(frozen=True)
class RuleVerdict:
    """A decision over rules: passed or not, every rule with its result, and a one-line summary.

    Subclasses name the two outcomes (``PASSED``, ``REFUSED``); a refusal's
    summary lists the sentence of each failed rule, so it says which rule
    refused and by how much.
    """

    passed: bool
    rules: list[Rule]

    PASSED: ClassVar[str] = "passed: all rules passed"
    REFUSED: ClassVar[str] = "refused"

    @property
    def failed(self) -> list[Rule]:
        return [r for r in self.rules if not r.passed]

    @property
    def summary(self) -> str:
        if self.passed:
            return self.PASSED
        return f"{self.REFUSED}: " + "; ".join(r.sentence for r in self.failed)

    def rule_dicts(self) -> list[dict]:
        """Every rule as a dict with its sentence: how a verdict's rules are written to JSON."""
        return [asdict(r) | {"sentence": r.sentence} for r in self.rules]


def ratio(new: float, old: float) -> float:
    """``new / old``, failing safe when ``old`` is zero: the gate's and the guards' one definition.

    Both zero: 1.0 (no change). ``old`` zero and ``new`` positive: ``inf``, so
    an ``at_most`` rule (cost, latency) refuses and an ``at_least`` rule
    (confidence) passes: a rise from nothing is never waved through as "no
    change". A zero that only means "not measured" must not reach here.
    """
    if old > 0:
        return new / old
    return 1.0 if new <= 0 else float("inf")


def at_least(name: str, value: float, limit: float, ci: tuple[float, float] | None = None) -> Rule:
    value = round(value, 6)  # 0.90 - 0.88 must meet a 0.02 limit despite float noise
    return Rule(name, value, limit, ">=", value >= limit, *(ci or (None, None)))


def at_most(name: str, value: float, limit: float, ci: tuple[float, float] | None = None) -> Rule:
    value = round(value, 6)
    return Rule(name, value, limit, "<=", value <= limit, *(ci or (None, None)))


def markdown_table(rules: list[Rule], heading: str = "rule") -> str:
    """One row per rule; the interval column only when some rule has one."""
    ci = any(r.interval for r in rules)
    head = f"| {heading} | value |" + (" 95% CI |" if ci else "") + " limit | result |\n"
    rule = "|---|---|" + ("---|" if ci else "") + "---|---|\n"
    rows = "".join(f"| {r.name} | {r.value:+.4f} |" + (f" {r.interval} |" if ci else "")
                   + f" {r.comparison} {r.limit:+.4f} | {'pass' if r.passed else '**FAIL**'} |\n" for r in rules)
    return head + rule + rows


def html_table(rules: list[Rule], heading: str = "rule") -> str:
    ci = any(r.interval for r in rules)
    head = f"<tr><th>{heading}</th><th>value</th>" + ("<th>CI</th>" if ci else "") + "<th>limit</th><th>result</th></tr>"
    rows = "".join(
        f"<tr class={'pass' if r.passed else 'fail'}><td>{html.escape(r.name)}</td><td>{r.value:+.4f}</td>"
        + (f"<td>{r.interval}</td>" if ci else "")
        + f"<td>{html.escape(r.comparison)} {r.limit:+.4f}</td><td>{'pass' if r.passed else 'FAIL'}</td></tr>"
        for r in rules)
    return f"<table>{head}{rows}</table>"


def html_page(title: str, summary: str, body: str) -> str:
    return (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body><h2>{html.escape(title)}</h2><p><b>{html.escape(summary)}</b></p>{body}</body></html>")
