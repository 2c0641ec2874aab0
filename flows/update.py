"""update: train a challenger warm-started from the champion, gate it, ship it.

Triggered by the ``refit.drift.detected`` event (labels of the drifted
window) or run by hand with a labelled file: the hotfix path.
"""

from __future__ import annotations

from datetime import datetime, timezone

import mlflow
import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from flows.bootstrap import read_evaluation_sets
from flows.common import open_context, parse_time, user_error
from refit import modeling
from refit.data import text_hashes
from refit.errors import RefitError
from refit.policy import file_hash
from registry import versions
from registry.tracking import (RUN_TYPE, code_revision, flat_params, log_json, log_policy, log_training_input,
                               measured_cpu_seconds_per_example, month_spend)
from tasks.deploy import promote, read_reference, write_reference
from tasks.evaluate import evaluate_pair
from tasks.finetune import assemble, fine_tune, load_update_policy
from tasks.gate import gate, load_gate_policy
from tasks.ingest import labelled_window, read_labelled_file


def _month_start_ms() -> int:
    now = datetime.now(timezone.utc)
    return int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)


@flow(name="update")
def update(window_start: str | None = None, window_end: str | None = None, labels_path: str | None = None,
           drift_run_id: str | None = None, gate_policy: str = "gate") -> dict:
    """Fine-tune, evaluate against the champion, gate on quality and cost, promote on a pass.

    Args:
        window_start: start of the drifted traffic window whose delayed labels to learn from.
        window_end: its end.
        labels_path: a CSV/Parquet/JSON file with ``text`` and ``label`` (hotfix); replaces the window.
        drift_run_id: the MLflow run of the drift check that triggered this update (lineage).
        gate_policy: gate policy name or YAML path.
    """
    try:
        ctx = open_context()
        name = ctx.model_name
        policy, policy_path = load_update_policy()
        rules, rules_path = load_gate_policy(gate_policy)
        champion = versions.alias_version(name, versions.CHAMPION)
        if champion is None:
            raise RefitError(f"model {name} has no champion: run bootstrap first")
        sets = read_evaluation_sets(ctx)
        champion_dir = versions.download_adapter(name, champion)
        known_labels = modeling.read_labels(champion_dir)
        _, pool = read_reference(ctx.store, name, champion)
        if labels_path:
            source = labels_path
            new = read_labelled_file(labels_path, known_labels)
        else:
            if not (window_start and window_end):
                raise RefitError("give a window (window_start and window_end) or a labelled file (labels_path)")
            start, end = parse_time(window_start), parse_time(window_end)
            source = f"labelled requests {start.isoformat()} .. {end.isoformat()}"
            new = labelled_window(ctx.store, name, start, end, known_labels=known_labels)
        if len(new) < policy.min_new_examples:
            raise RefitError(f"only {len(new)} labelled examples in {source}; policy needs {policy.min_new_examples}")
        eval_texts = text_hashes(pd.concat(sets.values())["text"])
        training = assemble(new, pool, eval_texts, policy.replay_ratio, ctx.settings.seed)
    except RefitError as exc:
        return user_error(exc)

    kind = "hotfix" if labels_path else "update"
    per_example = measured_cpu_seconds_per_example(ctx.experiment_id, name) or policy.cpu_seconds_per_example
    estimate_usd = ctx.rates.price(len(training.frame) * policy.update.epochs * per_example)
    spent = month_spend(ctx.experiment_id, name, _month_start_ms())
    tags = {RUN_TYPE: "update", "refit.model": name, "refit.kind": kind, "refit.parent_version": str(champion),
            "refit.drift_run_id": drift_run_id or "none", "refit.data_source": source}
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name=kind, tags=tags) as run:
        mlflow.log_params(flat_params("recipe", policy.update) | flat_params("gate", rules) | {
            "replay_ratio": policy.replay_ratio, "new_rows": training.new_rows, "replay_rows": training.replay_rows,
            "duplicates_dropped": training.duplicates_dropped, "leaked_dropped": training.leaked_dropped,
            "train_fingerprint": training.fingerprint})
        log_policy(policy_path)
        log_policy(rules_path)
        mlflow.log_metrics({"estimate_cost_usd": estimate_usd, "month_spend_before_usd": spent})
        if spent + estimate_usd > ctx.settings.monthly_budget_usd:
            reason = (f"refused before training: estimated ${estimate_usd:.4f} would take this month's spend "
                      f"${spent:.4f} past the budget ${ctx.settings.monthly_budget_usd:.2f}")
            mlflow.set_tags({"refit.gate_verdict": "refused", "refit.gate_reasons": reason})
            mlflow.log_metric("update_cost_usd", 0.0)
            get_run_logger().info(reason)
            return {"promoted": False, "version": None, "champion": champion, "reason": reason, "run_id": run.info.run_id}

        log_training_input(training.frame, source, training.fingerprint)
        trained = fine_tune(training.frame, policy.update, ctx.rates, warm_start=champion_dir, seed=ctx.settings.seed)
        mlflow.log_artifacts(str(trained.adapter_dir), versions.ADAPTER_DIR)
        before, after = evaluate_pair(champion_dir, trained.adapter_dir, sets, ctx.rates)
        verdict = gate(before, after, trained.cost.usd, rules)
        mlflow.log_metrics(trained.cost.metrics() | before.metrics("champion") | after.metrics("challenger") | {
            "update_cost_usd": trained.cost.usd,
            "estimate_error_pct": 100 * (estimate_usd - trained.cost.usd) / max(trained.cost.usd, 1e-12),
            "gate_passed": float(verdict.passed)})
        mlflow.log_text(verdict.html(f"Gate: {name} {kind} on v{champion}"), "gate.html")
        log_json(verdict.to_dict(), "gate.json")
        mlflow.set_tags({"refit.gate_verdict": "passed" if verdict.passed else "refused",
                         "refit.gate_reasons": verdict.summary[:5000]})
        version = versions.register(name, run.info.run_id, {
            "refit.parent_version": str(champion),
            "refit.kind": kind,
            "refit.data_source": source,
            "refit.train_data_fingerprint": training.fingerprint,
            "refit.drift_run_id": drift_run_id or "none",
            "refit.code_revision": code_revision(),
            "refit.base_model_sha256": modeling.base_model_hash(),
            "refit.policy_hash": file_hash(rules_path),
            "refit.gate_verdict": "passed" if verdict.passed else "refused",
            "refit.gate_reasons": verdict.summary,
            "refit.update_cost_usd": trained.cost.usd,
            "refit.update_cpu_seconds": trained.cost.cpu_seconds,
            "refit.golden_accuracy": round(after.slices["golden"].accuracy, 4),
            "refit.shifted_accuracy": round(after.slices["shifted"].accuracy, 4),
        })
        versions.set_alias(name, versions.CHALLENGER, version)
        if verdict.passed:
            model = modeling.load_model(trained.adapter_dir)
            reference_uri = write_reference(ctx.store, name, version, model, modeling.load_tokenizer(),
                                            pool=pd.concat([pool, training.frame[training.frame.origin == "new"]]),
                                            trained_on=training.frame, seed=ctx.settings.seed)
            versions.set_tags(name, version, {"refit.reference_uri": reference_uri})
            promote(name, version, champion)
        result = {
            "kind": kind, "promoted": verdict.passed, "version": version, "parent_version": champion,
            "champion": version if verdict.passed else champion, "verdict": verdict.summary, "run_id": run.info.run_id,
            "shifted_accuracy_before": before.slices["shifted"].accuracy,
            "shifted_accuracy_after": after.slices["shifted"].accuracy,
            "golden_accuracy_before": before.slices["golden"].accuracy,
            "golden_accuracy_after": after.slices["golden"].accuracy,
            "cpu_seconds": trained.cost.cpu_seconds, "cost_usd": trained.cost.usd,
            "estimate_cost_usd": estimate_usd,
        }
        log_json(result, "update.json")
    create_markdown_artifact(f"# {kind.title()} of {name}: v{version} {'promoted' if verdict.passed else 'refused'}\n\n"
                             + verdict.markdown()
                             + f"\nTraining: {trained.cost.cpu_seconds:.1f} CPU-s, ${trained.cost.usd:.5f}; "
                               f"{training.new_rows} new + {training.replay_rows} replay rows.\n",
                             key="gate-verdict", description=f"{name} v{version}: {verdict.summary[:100]}")
    get_run_logger().info(f"{kind}: v{version} {'promoted to champion' if verdict.passed else 'refused'}: {verdict.summary}")
    return result
