"""The budget: the month's ledger of update spend, reservations before training, and stopped updates charged.

The ledger is the update runs in MLflow themselves; nothing else keeps a
balance that could drift from them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
from mlflow import MlflowClient

from registry.tracking import RUN_TYPE, charge_killed_update


def month_updates(experiment_id: str, model_name: str, month_start_ms: int, page_size: int = 1000) -> list:
    """Every update run of ``model_name`` this month, however many: the search is read page by page.

    An update is charged to the month it started in (its reservation is
    written then), so a run that ends after midnight on the first stays in
    the month whose budget let it start.
    """
    client, runs, token = MlflowClient(), [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=(
            f"tags.`{RUN_TYPE}` = 'update' and tags.`refit.model` = '{model_name}' "
            f"and attributes.start_time >= {month_start_ms}"), max_results=page_size, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def month_spend(experiment_id: str, model_name: str, month_start_ms: int) -> float:
    """Update spend this month: the ledger is the update runs themselves.

    A finished (or closed) run counts what it was charged (``update_cost_usd``);
    one still training counts what it reserved before training
    (``reserved_usd``), so two updates at once cannot both spend the same
    headroom.
    """
    return float(sum(run.data.metrics.get("update_cost_usd", run.data.metrics.get("reserved_usd", 0.0))
                     for run in month_updates(experiment_id, model_name, month_start_ms)))


def reserve_budget(experiment_id: str, model_name: str, run_id: str, reserve_usd: float, budget_usd: float,
                   month_start_ms: int) -> tuple[bool, float]:
    """Reserve ``reserve_usd`` on the update run before it trains: (whether it fits, the month's spend with it).

    The reservation is written first and the ledger read after, so of two
    updates racing for the last headroom at least the later one sees the
    other's reservation (both may refuse: the budget fails closed). A
    refused reservation is withdrawn to what the run had reserved before.
    """
    client = MlflowClient()
    before = client.get_run(run_id).data.metrics.get("reserved_usd", 0.0)
    client.log_metric(run_id, "reserved_usd", reserve_usd)
    spend = month_spend(experiment_id, model_name, month_start_ms)
    if spend <= budget_usd + 1e-12:
        return True, spend
    client.log_metric(run_id, "reserved_usd", before)
    return False, spend


@contextmanager
def killed_charged(run_id: str, what: str, charge: bool = True) -> Iterator[None]:
    """Inside a flow's MLflow run: a stop signal (SIGTERM, which Prefect raises, or Ctrl-C) closes the run KILLED.

    An update's run is charged (``charge_killed_update``) before the signal
    goes on up, so MLflow never shows it FAILED or RUNNING and the month's
    ledger has what the machine spent; other runs (``charge=False``) are
    only closed.
    """
    from prefect.exceptions import ExternalSignal

    try:
        yield
    except (KeyboardInterrupt, SystemExit, ExternalSignal) as exc:
        why = f"stopped by {'SIGTERM' if isinstance(exc, ExternalSignal) else type(exc).__name__} while running"
        if charge:
            charged, _ = charge_killed_update(run_id, f"{why} ({what})")
            note = f", charged ${charged:.5f}"
        else:
            MlflowClient().set_tag(run_id, "refit.abandoned", f"{why} ({what})")
            note = ""
        mlflow.end_run("KILLED")
        logging.getLogger("refit").warning(f"{what}: {why}; run {run_id} closed KILLED{note}")
        raise


def spend_by_stage(runs: list) -> dict[str, float]:
    """USD per stage over update runs (``stage_cost_usd.<stage>``); ``other`` is the rest of each whole-update
    cost (bookkeeping between stages, a run closed before its stages were logged), so the stages add up to the
    ledger's ``update_cost_usd``."""
    by_stage: dict[str, float] = {}
    for run in runs:
        metrics = run.data.metrics
        staged = {k.removeprefix("stage_cost_usd."): v for k, v in metrics.items() if k.startswith("stage_cost_usd.")}
        for stage, usd in staged.items():
            by_stage[stage] = by_stage.get(stage, 0.0) + usd
        rest = metrics.get("update_cost_usd", 0.0) - sum(staged.values())
        by_stage["other"] = by_stage.get("other", 0.0) + rest
    return {k: round(v, 8) for k, v in sorted(by_stage.items())}


def overhead_estimate_cpu_seconds(experiment_id: str, model_name: str, newest: int = 5) -> float:
    """What an update spends besides training, from the newest promoted updates' stage meters (median CPU-s of
    labels, evaluate, gate, register, reference, cascade and deploy together); 0 before any was measured."""
    import statistics

    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=(f"tags.`{RUN_TYPE}` = 'update' and tags.`refit.model` = '{model_name}' "
                                        "and metrics.update_cpu_seconds > 0 and tags.`refit.gate_verdict` = 'passed'"),
        order_by=["attributes.start_time DESC"], max_results=newest)
    rest = [r.data.metrics["update_cpu_seconds"] - r.data.metrics.get("train_cpu_seconds", 0.0) for r in runs]
    return max(0.0, statistics.median(rest)) if rest else 0.0


def grown_stages(this_month: list, last_month: list, factor: float = 1.25) -> list[str]:
    """Stages whose cost per update this month is more than ``factor`` times last month's (new stages too)."""
    if not this_month or not last_month:
        return []
    now = {k: v / len(this_month) for k, v in spend_by_stage(this_month).items()}
    before = {k: v / len(last_month) for k, v in spend_by_stage(last_month).items()}
    return sorted(k for k, v in now.items() if k != "other" and v > 0 and v > factor * before.get(k, 0.0))
