"""Cost on one page: what each model costs to keep fresh and to serve, from the MLflow ledger and the request log.

Per model: the champion and how many versions exist, the updates of this
calendar month (UTC) and their spend against ``REFIT_MONTHLY_BUDGET_USD``
(the ledger is the update runs themselves, as the update flow's budget check
reads it), inference CPU-seconds per 1,000 predictions for the champion
alone and as a cascade (measured when the cascade was gated, tags
``refit.cascade_*``), the student's share (gated, and live from the request
log's ``served_by``), the estimated monthly serving cost at the request
rate the request log shows, and label spend beside compute: labels that
arrived this month and texts asked for this month (``refit labels
request``), priced at ``label_usd`` (``refit/policies/labels.yaml``). No
Prefect here.
"""

from __future__ import annotations

import html
from datetime import datetime, timedelta, timezone

RATE_DAYS = 7  # the request-log window the request rate and live share are read from
SECONDS_PER_MONTH = 30 * 86400


def _float(tags: dict, key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def label_counts(store, model_name: str, since: datetime) -> tuple[int, int]:
    """Labels that arrived (rows under ``labels/model=<name>/date=``) and texts asked for, both since ``since``."""
    from refit import requestlog
    from tasks.label_requests import requested

    arrived = len(requestlog.label_pairs(store, model_name, since.date()))
    return arrived, len(requested(store, model_name, since))


def model_report(model_name: str, experiment_id: str, store, cpu_usd_per_hour: float, budget_usd: float,
                 now: datetime | None = None, label_usd: float | None = None) -> dict:
    """One model's page as plain data (every money figure in USD; ``label_usd`` None: the shipped policy's)."""
    import pandas as pd
    from mlflow import MlflowClient

    from refit import requestlog
    from registry import versions
    from tasks.budget import grown_stages, month_updates, spend_by_stage
    from refit.runtime.cascade import FALLBACK_TAG, VERDICT_TAG, student_share

    now = now or datetime.now(timezone.utc)
    client = MlflowClient()
    registered = client.search_model_versions(f"name='{model_name}'")
    champion = versions.alias_version(model_name, versions.CHAMPION)
    since = month_start(now)
    runs = month_updates(experiment_id, model_name, int(since.timestamp() * 1000))
    spend = float(sum(run.data.metrics.get("update_cost_usd", 0.0) for run in runs))
    last_month = month_start(since - timedelta(days=1))
    earlier = [r for r in month_updates(experiment_id, model_name, int(last_month.timestamp() * 1000))
               if r.info.start_time < int(since.timestamp() * 1000)]
    promoted = sum(1 for run in runs if run.data.tags.get("refit.gate_verdict") == "passed")
    tags = versions.version_tags(model_name, champion) if champion is not None else {}
    champion_cpu = _float(tags, "refit.cascade_champion_cpu_seconds_per_1k")
    cascade_cpu = _float(tags, "refit.cascade_cpu_seconds_per_1k")
    cascade_served = tags.get(VERDICT_TAG) == "passed" and not tags.get(FALLBACK_TAG)
    window = requestlog.read_inference(store, model_name, now - timedelta(days=RATE_DAYS), now)
    rate = 0.0
    if len(window):
        first = pd.to_datetime(window["timestamp"], utc=True).min().to_pydatetime()
        rate = len(window) / max((now - first).total_seconds(), 1.0)
    served_cpu = cascade_cpu if cascade_served else champion_cpu
    if cascade_served:
        state = "served"
    elif tags.get(FALLBACK_TAG):
        state = "fell back to the champion (live guard)"
    else:
        state = tags.get(VERDICT_TAG) or "none"
    per_prediction_usd = None if served_cpu is None else served_cpu / 1000 / 3600 * cpu_usd_per_hour
    if label_usd is None:
        from tasks.label_requests import load_label_policy

        label_usd = load_label_policy()[0].label_usd
    arrived, asked = label_counts(store, model_name, since)
    return {
        "model_name": model_name,
        "champion": champion,
        "versions": len(registered),
        "month": since.strftime("%Y-%m"),
        "updates_this_month": len(runs),
        "promoted_this_month": promoted,
        "spend_usd": round(spend, 6),
        "spend_by_stage": spend_by_stage(runs),  # adds up to spend_usd: every stage of every update this month
        "stages_grown": grown_stages(runs, earlier),  # cost per update above 1.25x last month's
        "budget_usd": budget_usd,
        "budget_left_usd": round(budget_usd - spend, 6),
        "champion_cpu_seconds_per_1k": champion_cpu,
        "cascade_cpu_seconds_per_1k": cascade_cpu,
        "cascade": state,
        "cascade_reasons": tags.get("refit.cascade_fallback") or tags.get("refit.cascade_reasons"),
        "student_share_gated": _float(tags, "refit.cascade_student_share"),
        "student_share_live": student_share(window) if len(window) else None,
        "requests_last_days": len(window),
        "requests_per_second": round(rate, 6),
        "serving_cost_per_1k_usd": None if per_prediction_usd is None else round(per_prediction_usd * 1000, 8),
        "monthly_serving_cost_usd": None if per_prediction_usd is None
        else round(per_prediction_usd * rate * SECONDS_PER_MONTH, 8),
        "label_usd": label_usd,
        "labels_arrived_this_month": arrived,
        "labels_requested_this_month": asked,
        "label_spend_usd": round(arrived * label_usd, 6),
        "label_requested_usd": round(asked * label_usd, 6),
        "spend_with_labels_usd": round(spend + arrived * label_usd, 6),
    }


ROWS = (("champion", "champion"), ("versions", "versions"), ("updates this month", "updates_this_month"),
        ("promoted this month", "promoted_this_month"), ("update spend (USD)", "spend_usd"),
        ("update spend by stage (USD)", "spend_by_stage"), ("stages grown since last month", "stages_grown"),
        ("budget (USD)", "budget_usd"), ("budget left (USD)", "budget_left_usd"),
        ("champion alone: CPU-s / 1,000", "champion_cpu_seconds_per_1k"),
        ("cascade: CPU-s / 1,000", "cascade_cpu_seconds_per_1k"), ("cascade", "cascade"),
        ("student share (gated)", "student_share_gated"), ("student share (live)", "student_share_live"),
        ("requests / s (request log)", "requests_per_second"),
        ("serving cost / 1,000 (USD)", "serving_cost_per_1k_usd"),
        ("monthly serving cost (USD, estimated)", "monthly_serving_cost_usd"),
        ("labels arrived this month", "labels_arrived_this_month"),
        ("labels requested this month", "labels_requested_this_month"),
        ("price of a label (USD)", "label_usd"), ("label spend (USD, arrived)", "label_spend_usd"),
        ("label spend (USD, requested)", "label_requested_usd"),
        ("update + label spend (USD)", "spend_with_labels_usd"))


def _value(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.6g}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def markdown(reports: list[dict]) -> str:
    out = []
    for r in reports:
        out.append(f"## {r['model_name']} ({r['month']})\n\n| | |\n|---|---|\n"
                   + "".join(f"| {label} | {_value(r[key])} |\n" for label, key in ROWS))
    return "# Cost report\n\n" + "\n".join(out)


def html_page(reports: list[dict]) -> str:
    from refit.verdict import STYLE

    body = "".join(
        f"<h3>{html.escape(r['model_name'])} ({r['month']})</h3><table>"
        + "".join(f"<tr><td>{html.escape(label)}</td><td>{html.escape(_value(r[key]))}</td></tr>" for label, key in ROWS)
        + "</table>" for r in reports)
    return (f"<html><head><meta charset='utf-8'><title>Cost report</title><style>{STYLE}</style></head>"
            f"<body><h2>Cost report</h2>{body}</body></html>")


def cost_report(model_names: list[str] | None, experiment_id: str, store, cpu_usd_per_hour: float,
                budget_usd: float, log: bool = True) -> list[dict]:
    """Every named model's page (all registered models when None); with ``log``, a ``report`` run holds it."""
    import mlflow
    from mlflow import MlflowClient

    from registry.tracking import RUN_TYPE, log_json

    names = model_names or sorted(m.name for m in MlflowClient().search_registered_models())
    reports = [model_report(name, experiment_id, store, cpu_usd_per_hour, budget_usd) for name in names]
    if log:
        with mlflow.start_run(experiment_id=experiment_id, run_name="cost report", tags={RUN_TYPE: "report"}):
            mlflow.log_text(html_page(reports), "report.html")
            mlflow.log_text(markdown(reports), "report.md")
            log_json(reports, "report.json")
    return reports


def cascade_figures(model_name: str, version: int) -> dict:
    """A version's cascade as its gate measured it: what ``refit demo --json`` adds (None without a cascade)."""
    from registry import versions
    from refit.runtime.cascade import FALLBACK_TAG, VERDICT_TAG

    tags = versions.version_tags(model_name, version)
    return {"cascade_served": tags.get(VERDICT_TAG) == "passed" and not tags.get(FALLBACK_TAG),
            "cascade_verdict": tags.get("refit.cascade_reasons"),
            "cascade_cost_ratio": _float(tags, "refit.cascade_cost_ratio"),
            "cascade_accuracy_ratio": _float(tags, "refit.cascade_accuracy_ratio"),
            "student_share": _float(tags, "refit.cascade_student_share")}
