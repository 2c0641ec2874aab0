"""The update's ladder: recipes from cheapest up, each reserved in the budget, trained, evaluated and gated.

A rung runs as a nested MLflow run of the update. The ladder climbs only
when the gate refused for a reason a costlier recipe can fix (the update
policy's ``escalate_on``), and stops at the first pass, at a refusal that
more training would not change, or where the budget says no: every rung
reserves the whole update's estimate (its training plus the evaluation,
gate, reference, cascade and deploy that follow, from measured history)
before it trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd
from prefect.logging import get_run_logger

from refit import faults, modeling
from refit.cost import StageMeters
from refit.runtime.encoder_states import EncoderStates
from registry import versions
from registry.tracking import RUN_TYPE, flat_params, log_json, measured_cpu_seconds_per_work_token
from tasks.budget import month_spend, overhead_estimate_cpu_seconds, reserve_budget
from tasks.evaluate import Evaluation, evaluate_pair
from tasks.finetune import Recipe, Trained, UpdateData, count_tokens, escalates, fine_tune, full_retrain_frame
from tasks.gate import GatePolicy, Verdict, gate


def month_start_ms() -> int:
    """The first instant of this month (UTC), in MLflow's milliseconds: where the budget's month begins."""
    now = datetime.now(timezone.utc)
    return int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)


def flow_run_id() -> str:
    """This Prefect flow run's id, or ``none`` outside one: tagged on runs so a killed update can be found."""
    from prefect.runtime import flow_run

    return flow_run.id or "none"


@dataclass(frozen=True)
class Attempt:
    """One rung tried: its recipe, what it cost, how both models scored, and the gate's verdict."""

    index: int
    recipe: Recipe
    estimate_usd: float
    run_id: str
    trained: Trained
    before: Evaluation
    after: Evaluation
    verdict: Verdict

    def summary(self) -> dict:
        return {"recipe": self.recipe.name, "passed": self.verdict.passed,
                "cpu_seconds": self.trained.cost.cpu_seconds, "cost_usd": self.trained.cost.usd,
                "run_id": self.run_id}


@dataclass
class Ladder:
    """The rungs an update tried, and why it stopped where it did."""

    attempts: list[Attempt] = field(default_factory=list)
    stop: str = ""  # why no rung ran or the budget stopped the climb
    trained_on: pd.DataFrame | None = None  # the final rung's training rows
    tokenizer: object = None  # the champion's, which every rung and the new reference share

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    @property
    def train_cost_usd(self) -> float:
        return sum(a.trained.cost.usd for a in self.attempts)

    @property
    def train_cpu_seconds(self) -> float:
        return sum(a.trained.cost.cpu_seconds for a in self.attempts)

    def markdown(self) -> str:
        rows = "".join(
            f"| {a.index} | {a.recipe.name} | {a.trained.cost.cpu_seconds:.1f} | {a.trained.cost.usd:.5f} | "
            f"{a.after.slices['fresh'].accuracy:.3f} | {a.after.slices['golden'].accuracy:.3f} | "
            f"{'pass' if a.verdict.passed else 'refused'} |\n" for a in self.attempts)
        return ("| attempt | recipe | CPU-s | USD | fresh acc | golden acc | gate |\n"
                "|---|---|---|---|---|---|---|\n" + rows)


def climb(ctx, run_id: str, policy, data: UpdateData, pool: pd.DataFrame, champion_dir: Path, start_dir: Path,
          rules: GatePolicy, meters: StageMeters) -> Ladder:
    """Try the policy's rungs in order inside the update run ``run_id``, reserving the budget before each."""
    name, training = ctx.model_name, data.training
    frames = {"warm": training.frame, "fresh": full_retrain_frame(pool, training, data.eval_texts)}
    tokenizer = modeling.load_tokenizer(champion_dir)
    tokens = {start: count_tokens(frame["text"].tolist(), tokenizer) for start, frame in frames.items()
              if any(r.start == start for r in policy.ladder)}  # tokenised once, priced per rung
    per_token = measured_cpu_seconds_per_work_token(ctx.experiment_id, name) or policy.cpu_seconds_per_work_token
    overhead = ctx.rates.price(overhead_estimate_cpu_seconds(ctx.experiment_id, name))
    budget = ctx.settings.monthly_budget_usd
    mlflow.log_metric("month_spend_before_usd", month_spend(ctx.experiment_id, name, month_start_ms()))
    ladder = Ladder(stop=f"no rung of the ladder takes {training.new_rows} new rows", tokenizer=tokenizer)
    for index, recipe in enumerate(policy.ladder, start=1):
        recipe = data.recipe(recipe, policy)
        if training.new_rows < recipe.min_new_rows:
            get_run_logger().info(f"rung {recipe.name} skipped: {training.new_rows} new rows, it needs "
                                  f"{recipe.min_new_rows}")
            continue
        work = recipe.work_tokens(tokens[recipe.start])
        estimate = ctx.rates.price(work * per_token)
        whole = estimate + overhead
        if index == 1:
            mlflow.log_metrics({"estimate_cost_usd": estimate, "estimate_whole_cost_usd": whole})
        # Reserved in the ledger before training, so an update running beside this one counts it.
        fits, month_with_reservation = reserve_budget(ctx.experiment_id, name, run_id, ladder.train_cost_usd + whole,
                                                      budget, month_start_ms())
        if not fits:
            ladder.stop = _budget_stop(index, recipe, whole, month_with_reservation - whole, budget)
            get_run_logger().info(ladder.stop)
            mlflow.set_tag("refit.ladder_stopped", ladder.stop)
            break
        ladder.attempts.append(run_attempt(ctx, index, recipe, frames[recipe.start], champion_dir, start_dir, data,
                                           rules, work, estimate, budget - (month_with_reservation - whole), meters))
        ladder.trained_on = frames[recipe.start]
        if ladder.final.verdict.passed or not escalates([r.name for r in ladder.final.verdict.failed], policy):
            break
    return ladder


def _budget_stop(index: int, recipe: Recipe, whole_usd: float, others_usd: float, budget_usd: float) -> str:
    if index == 1:
        return (f"refused before training: estimated ${whole_usd:.4f} for the whole update would take this "
                f"month's spend (${others_usd:.4f} with every reservation) past the budget ${budget_usd:.2f}")
    return (f"budget stops the ladder before {recipe.name}: estimated ${whole_usd:.4f} on top of "
            f"${others_usd:.4f} passes ${budget_usd:.2f}")


def run_attempt(ctx, index: int, recipe: Recipe, frame: pd.DataFrame, champion_dir, start_dir, data: UpdateData,
                rules: GatePolicy, work_tokens: float, estimate_usd: float, budget_left_usd: float,
                meters: StageMeters) -> Attempt:
    """One rung of the ladder as a nested MLflow run: train, evaluate against the champion, gate.

    A warm rung starts from ``start_dir``: the champion's adapter, its head
    grown by the update's new labels where there are any.
    """
    name = ctx.model_name
    tags = {RUN_TYPE: "update-attempt", "refit.model": name, "refit.recipe": recipe.name,
            "refit.flow_run_id": flow_run_id()}
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name=f"attempt {index}: {recipe.name}",
                          nested=True, tags=tags) as attempt_run:
        mlflow.log_params(flat_params("recipe", recipe) | {"rows": len(frame)})
        warm = start_dir if recipe.start == "warm" else None
        with meters.stage("train"):
            trained = fine_tune(frame, recipe, ctx.rates, labels=data.labels, warm_start=warm, seed=ctx.settings.seed,
                                base=modeling.base_of(champion_dir),
                                states=EncoderStates.of(ctx.store, name, warm) if warm else None)
            faults.point("update.after_train")
            mlflow.log_artifacts(str(trained.adapter_dir), versions.ADAPTER_DIR)
        with meters.stage("evaluate"):
            before, after = evaluate_pair(champion_dir, trained.adapter_dir, data.sets, ctx.rates, store=ctx.store,
                                          model_name=name)  # judging sets' encoder states kept for the next
        with meters.stage("gate"):
            verdict = gate(before, after, trained.cost.usd, rules, budget_left_usd, tuple(data.learned))
        mlflow.log_metrics(trained.cost.metrics() | before.metrics("champion") | after.metrics("challenger") | {
            "train_work_tokens": work_tokens, "estimate_cost_usd": estimate_usd,
            "estimate_error_pct": 100 * (estimate_usd - trained.cost.usd) / max(trained.cost.usd, 1e-12),
            "update_cost_usd": trained.cost.usd, "gate_passed": float(verdict.passed),
            "encoder_states_reused": trained.reused_states})
        mlflow.log_text(verdict.html(f"Gate: {name} attempt {index} ({recipe.name})"), "gate.html")
        log_json(verdict.to_dict(), "gate.json")
        mlflow.set_tags({"refit.gate_verdict": "passed" if verdict.passed else "refused",
                         "refit.gate_reasons": verdict.summary[:5000]})
    get_run_logger().info(f"attempt {index} ({recipe.name}): {trained.cost.cpu_seconds:.1f} CPU-s, "
                          f"${trained.cost.usd:.5f}: {verdict.summary}")
    return Attempt(index, recipe, estimate_usd, attempt_run.info.run_id, trained, before, after, verdict)
