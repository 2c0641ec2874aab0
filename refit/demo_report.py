"""The demo's summary: what each shift did, and how the final champion stands.

Plain data, no Prefect: the demo flow collects one ``ShiftOutcome`` per
shift and ``summarize`` turns them into the JSON object ``refit demo --json``
prints. ``external`` accuracies are the scenario's test texts of each shift,
scored for this report only; every decision was taken on the fresh holdout
and the golden suite.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShiftOutcome:
    name: str
    drift: dict  # the monitor's verdict on the shift's window
    update: dict | None  # the update flow's result, or None when the monitor started none
    external_before: float  # the champion on the shift's test texts
    external_after: float  # the champion at the shift's end (the one before, when nothing was promoted)
    windows: int = 1  # the windows the shift's traffic was spread over
    promoted_after_window: int | None = None  # 1-based: the window whose update was promoted first; None if never

    @property
    def promoted(self) -> bool:
        return bool(self.update and self.update.get("promoted"))

    def to_dict(self) -> dict:
        update = self.update or {}
        return {
            "name": self.name,
            "drift_detected": bool(self.drift.get("drift_detected")),
            "severity": self.drift.get("severity"),
            "action": self.drift.get("action"),
            "promoted": self.promoted,
            "version": update.get("version"),
            "verdict": update.get("verdict") or update.get("reason") or self.drift.get("action_reason"),
            "attempts": [a["recipe"] for a in update.get("attempts", [])],
            "new_labels": int(update.get("new_labels", 0)),
            "fresh_rows": update.get("fresh_rows"),
            "fresh_accuracy_before": _round(update.get("fresh_accuracy_before")),
            "fresh_accuracy_after": _round(update.get("fresh_accuracy_after")),
            "golden_suite_accuracy_before": _round(update.get("golden_accuracy_before")),
            "golden_suite_accuracy_after": _round(update.get("golden_accuracy_after")),
            "external_accuracy_before": _round(self.external_before),
            "external_accuracy_after": _round(self.external_after),
            "cpu_seconds": round(float(update.get("cpu_seconds", 0.0)), 2),
            "cost_usd": float(update.get("cost_usd", 0.0)),
            "windows": self.windows,
            "promoted_after_window": self.promoted_after_window,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def summarize(*, v1: int, champion_after: int, quiet: dict, shifts: list[ShiftOutcome], hotfix: dict,
              golden_before: float, golden_after: float, external_final: dict[str, float], tracking_uri: str,
              store_uri: str, stage_seconds: dict[str, float], labels: dict[str, int] | None = None,
              stage_cpu_seconds: dict[str, float] | None = None,
              labels_by_shift: dict[str, dict[str, int]] | None = None,
              labels_requested: dict[str, int] | None = None) -> dict:
    """The JSON object of ``refit demo --json``.

    The keys of the one-shift demo stay: ``drift_detected_on_shift``,
    ``shifted_accuracy_*`` (the external accuracy of the first shift),
    ``update_*``. ``golden_accuracy_*`` are v1 and the final champion on
    v1's golden set.
    """
    rows = [s.to_dict() for s in shifts]
    for row in rows:  # every label that arrived for the shift's windows, and those a promoted update used
        fates = (labels_by_shift or {}).get(row["name"], {})
        row["labels_arrived"] = fates.get("arrived", 0)
        row["labels_used"] = fates.get("trained", 0) + fates.get("held_out", 0)
        if labels_requested:
            row["labels_requested"] = labels_requested.get(row["name"], 0)
    first = rows[0]
    extra = {"labels": labels or {"arrived": 0, "trained": 0, "held_out": 0, "waiting": 0, "quarantined": 0}}
    if labels_requested:
        extra["labels_requested"] = sum(labels_requested.values())
    return extra | {
        "champion_before": v1,
        "champion_after": champion_after,
        "no_drift_window_triggered": quiet["action"] != "none",
        "no_drift_window_verdict": f"{quiet['action']}: {quiet.get('action_reason', '')}"[:300],
        "shifts": rows,
        "external_accuracy_final": {k: round(v, 4) for k, v in external_final.items()},
        "golden_accuracy_before": round(golden_before, 4),
        "golden_accuracy_after": round(golden_after, 4),
        "drift_detected_on_shift": first["drift_detected"],
        "shifted_accuracy_before": first["external_accuracy_before"],
        "shifted_accuracy_after": first["external_accuracy_after"],
        "update_promoted": first["promoted"],
        "update_verdict": first["verdict"],
        "update_attempts": first["attempts"],
        "poisoned_hotfix_promoted": bool(hotfix.get("promoted")),
        "poisoned_hotfix_verdict": hotfix.get("verdict") or hotfix.get("reason"),
        "update_cpu_seconds": round(sum(r["cpu_seconds"] for r in rows), 2),
        "update_cost_usd": sum(r["cost_usd"] for r in rows),
        "mlflow_tracking_uri": tracking_uri,
        "store_uri": store_uri,
        "stage_seconds": stage_seconds,
        "stage_cpu_seconds": stage_cpu_seconds or {},
    }
