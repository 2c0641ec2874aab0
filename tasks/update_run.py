"""The update's bookkeeping: what it starts from, what it learns from, and what its MLflow run records and returns.

The update flow reads like the loop: gather labels, train and gate on the
ladder, ship. What it starts from (the champion, the policies, the golden
suite), the rows it learns from after the new-label policy and
pseudo-labels, and the tags, parameters, result and artifacts of its run
live here, beside the stages they describe.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from refit import modeling, processes
from refit.cost import StageMeters
from refit.errors import RefitError
from refit.evalsets import Golden, read_golden
from refit.labels import check_source
from registry import versions
from registry.tracking import (RUN_TYPE, close_abandoned_updates, finished_update, flat_params, log_json, log_policy,
                               log_training_input)
from tasks.budget import killed_charged
from tasks.deploy import read_reference
from tasks.finetune import UpdateData, add_pseudo_labels, load_update_policy, prepare_update
from tasks.gate import chosen_gate_policy, load_gate_policy
from tasks.ingest import Admitted, admit_new_labels, on_prefect_server
from tasks.labels import Labelled
from tasks.ladder import Ladder, flow_run_id


@dataclass(frozen=True)
class UpdateStart:
    """What an update starts from: the champion and its files, the policies, the golden suite, the replay pool."""

    kind: str  # update | hotfix
    policy: object  # tasks.finetune.UpdatePolicy
    policy_path: Path
    rules: object  # tasks.gate.GatePolicy
    rules_path: Path
    champion: int
    champion_dir: Path
    known_labels: list[str]
    golden: Golden
    pool: pd.DataFrame


def begin_update(ctx, labels_path: str | None, gate_policy: str | None) -> UpdateStart:
    """Check the source, close what a killed update left behind, and read the champion and the policies.

    Raises:
        RefitError: the file's source is not allowed, or the model has no champion.
    """
    name = ctx.model_name
    if labels_path:  # the operator's allow-list first, before anything is looked up or read
        check_source(labels_path, ctx.settings.allowed_label_sources(on_server=on_prefect_server()))
    closed = close_abandoned_updates(ctx.experiment_id, name, f"flow run {flow_run_id()}",
                                     _flow_run_ended if on_prefect_server() else None)
    if closed:
        get_run_logger().warning(f"closed {len(closed)} update run(s) left running by a killed update "
                                 f"(marked KILLED in MLflow, charged): {', '.join(closed)}")
    repaired = versions.repair_deployed_tags(name)
    if repaired:
        get_run_logger().warning(f"tagged v{', v'.join(map(str, repaired))} deployed: a promotion had stopped "
                                 "after moving the alias")
    policy, policy_path = load_update_policy()
    rules, rules_path = load_gate_policy(chosen_gate_policy(gate_policy, ctx.settings))
    champion = versions.alias_version(name, versions.CHAMPION)
    if champion is None:
        raise RefitError(f"model {name} has no champion: run bootstrap first")
    champion_dir = versions.download_adapter(name, champion)
    _, pool = read_reference(ctx.store, name, champion)
    return UpdateStart("hotfix" if labels_path else "update", policy, policy_path, rules, rules_path, champion,
                       champion_dir, modeling.read_labels(champion_dir), read_golden(ctx.store, name), pool)


def _flow_run_ended(flow_run_id: str) -> bool:
    """Whether that flow run is over on this Prefect server; one it does not know is not ours to judge."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(UUID(flow_run_id)).state
        except (ObjectNotFound, ValueError):
            return False
    return state is not None and state.is_final()


def already_updated(ctx, start: UpdateStart, labelled: Labelled) -> dict | None:
    """The result of an earlier update that paid for these very labels, or None: one fine-tune per trigger."""
    earlier = finished_update(ctx.experiment_id, ctx.model_name, labelled.trigger_key)
    if earlier is None:
        return None
    why = (f"already updated for these labels by run {earlier.info.run_id} "
           f"(against v{earlier.data.tags.get('refit.parent_version')}): not paying for a second "
           "fine-tune; force=true trains anyway")
    get_run_logger().info(why)
    return {"promoted": False, "version": None, "champion": start.champion, "reason": why,
            "duplicate_of": earlier.info.run_id, "attempts": []}


@dataclass(frozen=True)
class Learnable:
    """The rows an update learns and is judged on, after the new-label policy and pseudo-labels."""

    admitted: Admitted
    data: UpdateData


def learnable_rows(ctx, start: UpdateStart, labelled: Labelled) -> Learnable:
    """Admit new labels that have enough rows, hold out the fresh set, and lend new labels to look-alike texts."""
    admitted = admit_new_labels(ctx.store, ctx.model_name, labelled.rows, start.known_labels,
                                start.policy.min_examples_per_new_label)
    if admitted.waiting:
        get_run_logger().info(f"{admitted.waiting} row(s) of new labels below min_examples_per_new_label wait "
                              f"in quarantine: {'; '.join(admitted.reasons.values())[:500]}")
    data = prepare_update(admitted.rows, start.pool, start.golden.frame, start.known_labels, admitted.learned,
                          start.policy, labelled.source, ctx.settings.seed, judged_too=labelled.judged_too)
    data = add_pseudo_labels(data, start.pool, start.champion_dir, labelled.unlabelled, start.policy, ctx.rates)
    return Learnable(admitted, data)


def start_dir_for(ctx, start: UpdateStart, data: UpdateData) -> Path:
    """Where every rung starts: the champion, its head grown by the new labels (each from its examples' prototype)."""
    if not data.learned:
        return start.champion_dir
    get_run_logger().info(f"learning {len(data.learned)} new label(s): {', '.join(data.learned)[:500]}")
    return modeling.grow_head(start.champion_dir, data.learned, Path(tempfile.mkdtemp(prefix="refit-grown-")) / "a",
                              examples=data.training.frame, seed=ctx.settings.seed)


@contextmanager
def update_run(ctx, start: UpdateStart, labelled: Labelled, learnable: Learnable, drift_run_id: str | None,
               reason: str | None):
    """The update's MLflow run, tagged and with its inputs logged.

    SIGTERM (Prefect turns it into an exception) stops the update at once:
    the run is closed KILLED and charged what it spent.
    """
    name, kind, data = ctx.model_name, start.kind, learnable.data
    training, golden, admitted = data.training, start.golden, learnable.admitted
    tags = {RUN_TYPE: "update", "refit.model": name, "refit.kind": kind, "refit.parent_version": str(start.champion),
            "refit.drift_run_id": drift_run_id or "none", "refit.data_source": labelled.source,
            "refit.reason": reason or kind, "refit.trigger_key": labelled.trigger_key,
            "refit.flow_run_id": flow_run_id(), "refit.process": processes.identity()}
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name=kind, tags=tags) as run, \
            killed_charged(run.info.run_id, f"{kind} of {name}"):
        mlflow.log_params(flat_params("gate", start.rules) | {
            "ladder": " -> ".join(r.name for r in start.policy.ladder), "reason": reason or kind,
            "replay_ratio": start.policy.replay_ratio, "new_rows": training.new_rows,
            "replay_rows": training.replay_rows, "fresh_rows": len(data.fresh), "golden_rows": golden.rows,
            "golden_version": golden.version, "new_labels": len(data.learned), "young_labels": len(data.young),
            "new_label_rows_waiting": admitted.waiting, "new_label_rows_from_earlier": admitted.from_earlier,
            "duplicates_dropped": training.duplicates_dropped, "leaked_dropped": training.leaked_dropped,
            "train_fingerprint": training.fingerprint})
        log_policy(start.policy_path)
        log_policy(start.rules_path)
        log_training_input(training.frame, labelled.source, training.fingerprint)
        yield run


def nothing_trained(start: UpdateStart, ladder: Ladder, run_id: str) -> dict:
    """The result when no rung ran (none takes this many rows, or the budget refused the first)."""
    mlflow.set_tags({"refit.gate_verdict": "refused", "refit.gate_reasons": ladder.stop})
    mlflow.log_metric("update_cost_usd", 0.0)
    return {"promoted": False, "version": None, "champion": start.champion, "reason": ladder.stop,
            "run_id": run_id, "attempts": []}


def log_verdict(ctx, start: UpdateStart, ladder: Ladder, data: UpdateData) -> None:
    """The final rung's scores, gate page and ladder table on the update run, where the MLflow UI shows them."""
    final = ladder.final
    mlflow.log_metrics(final.before.metrics("champion") | final.after.metrics("challenger") | {
        "update_cost_usd": ladder.train_cost_usd, "train_cpu_seconds": ladder.train_cpu_seconds,
        "attempts": len(ladder.attempts), "gate_passed": float(final.verdict.passed),
        "new_labels": float(len(data.learned))})
    mlflow.log_text(final.verdict.html(f"Gate: {ctx.model_name} {start.kind} on v{start.champion}, attempt "
                                       f"{final.index} ({final.recipe.name})"), "gate.html")
    mlflow.log_text(ladder.markdown(), "ladder.md")
    log_json(final.verdict.to_dict(), "gate.json")
    mlflow.set_tags({"refit.gate_verdict": "passed" if final.verdict.passed else "refused",
                     "refit.gate_reasons": final.verdict.summary[:5000], "refit.final_attempt": final.recipe.name})


def finish(ctx, start: UpdateStart, labelled: Labelled, data: UpdateData, ladder: Ladder, version: int,
           run_id: str, meters: StageMeters) -> dict:
    """Log the whole update's cost (every stage, not only training) and return, and log, what it did."""
    whole_cpu = meters.whole()
    mlflow.log_metrics(meters.metrics(ctx.rates) | {"update_cpu_seconds": whole_cpu,
                                                    "update_cost_usd": ctx.rates.price(whole_cpu)})
    final, golden = ladder.final, start.golden
    passed = final.verdict.passed
    result = {
        "kind": start.kind, "action": "update", "episode": labelled.episode.id if labelled.episode else None,
        "promoted": passed, "version": version, "parent_version": start.champion,
        "champion": version if passed else start.champion, "verdict": final.verdict.summary, "run_id": run_id,
        "attempts": [a.summary() for a in ladder.attempts],
        "fresh_rows": len(data.fresh), "golden_rows": golden.rows, "golden_version": golden.version,
        "new_labels": len(data.learned), "labels_learned": data.learned,
        "fresh_accuracy_before": final.before.slices["fresh"].accuracy,
        "fresh_accuracy_after": final.after.slices["fresh"].accuracy,
        "golden_accuracy_before": final.before.slices["golden"].accuracy,
        "golden_accuracy_after": final.after.slices["golden"].accuracy,
        "cpu_seconds": whole_cpu, "cost_usd": ctx.rates.price(whole_cpu), "train_cpu_seconds": ladder.train_cpu_seconds,
        "train_cost_usd": ladder.train_cost_usd, "stage_cpu_seconds": dict(meters.cpu),
        "estimate_cost_usd": ladder.attempts[0].estimate_usd,
    }
    log_json(result, "update.json")
    return result


def publish(ctx, start: UpdateStart, data: UpdateData, ladder: Ladder, result: dict) -> None:
    """The gate's verdict as a Prefect artifact and a log line, once the run is closed."""
    name, kind, verdict = ctx.model_name, start.kind, ladder.final.verdict
    training, golden, version = data.training, start.golden, result["version"]
    create_markdown_artifact(
        f"# {kind.title()} of {name}: v{version} {'promoted' if verdict.passed else 'refused'}\n\n"
        + verdict.markdown() + "\n" + ladder.markdown()
        + f"\nWhole update: {result['cpu_seconds']:.1f} CPU-s, ${result['cost_usd']:.5f}; training "
          f"{ladder.train_cpu_seconds:.1f} CPU-s, ${ladder.train_cost_usd:.5f} in {len(ladder.attempts)} attempt(s); "
          f"{training.new_rows} new + {training.replay_rows} replay rows; judged on "
          f"{len(data.fresh)} fresh rows and golden suite v{golden.version} ({golden.rows} rows).\n",
        key="gate-verdict", description=f"{name} v{version}: {verdict.summary[:100]}")
    get_run_logger().info(f"{kind}: v{version} {'promoted to champion' if verdict.passed else 'refused'}: "
                          f"{verdict.summary}")


def clean_up(start: UpdateStart, ladder: Ladder, start_dir: Path) -> None:
    """Every adapter is in MLflow now; the local copies are scratch."""
    for attempt in ladder.attempts:
        shutil.rmtree(attempt.trained.adapter_dir, ignore_errors=True)
    if start_dir != start.champion_dir:
        shutil.rmtree(start_dir.parent, ignore_errors=True)
