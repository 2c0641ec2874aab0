"""update: train a challenger warm-started from the champion, gate it, ship it.

Triggered by the ``refit.drift.detected`` event (labels of the drifted
window) or run by hand with a labelled file: the hotfix path. Either way the
new labelled rows are split into training rows and a fresh holdout: the gate
judges the improvement on the fresh holdout (the drift that happened) and
non-regression on the golden suite, which the fresh holdout joins when the
update is promoted. Labels the champion does not know grow its head once
enough rows of them arrived.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.transactions import transaction

from flows.common import on_prefect_server, one_at_a_time, open_context, parse_time, settings_for, user_error
from refit import faults, modeling, procs, requestlog
from refit.cost import StageMeters
from refit.data import fingerprint
from refit.runtime.encoder_states import EncoderStates
from refit.evalsets import read_golden
from refit.errors import RefitError
from refit.labels import check_source
from registry import episodes, versions
from registry.episodes import Episode
from registry.tracking import (RUN_TYPE, close_abandoned_updates, finished_update, flat_params,
                               log_json, log_policy, log_training_input, measured_cpu_seconds_per_work_token)
from tasks.budget import killed_charged, month_spend, overhead_estimate_cpu_seconds, reserve_budget
from tasks.cascade import cascade
from tasks.deploy import promote_update, read_reference, register_version, update_version_tags, write_reference
from tasks.evaluate import Evaluation, evaluate_pair
from tasks.finetune import (Recipe, Trained, UpdateData, add_pseudo_labels, count_tokens, escalates, fine_tune,
                            full_retrain_frame, load_update_policy, prepare_update)
from tasks.gate import GatePolicy, Verdict, chosen_gate_policy, gate, load_gate_policy
from tasks.ingest import admit_new_labels, labelled_window, read_labelled_file
from tasks.labels import enough, episode_labels, labels_since, record_used


def _month_start_ms() -> int:
    now = datetime.now(timezone.utc)
    return int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)


@dataclass(frozen=True)
class Attempt:
    index: int
    recipe: Recipe
    estimate_usd: float
    run_id: str
    trained: Trained
    before: Evaluation
    after: Evaluation
    verdict: Verdict


def run_attempt(ctx, index: int, recipe: Recipe, frame: pd.DataFrame, champion_dir, start_dir, data: UpdateData,
                rules: GatePolicy, work_tokens: float, estimate_usd: float, budget_left_usd: float,
                meters: StageMeters) -> Attempt:
    """One rung of the ladder as a nested MLflow run: train, evaluate against the champion, gate.

    A warm rung starts from ``start_dir``: the champion's adapter, its head
    grown by the update's new labels where there are any.
    """
    name = ctx.model_name
    tags = {RUN_TYPE: "update-attempt", "refit.model": name, "refit.recipe": recipe.name,
            "refit.flow_run_id": _flow_run_id()}
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


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return flow_run.id or "none"


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


def ladder_markdown(attempts: list[Attempt]) -> str:
    rows = "".join(
        f"| {a.index} | {a.recipe.name} | {a.trained.cost.cpu_seconds:.1f} | {a.trained.cost.usd:.5f} | "
        f"{a.after.slices['fresh'].accuracy:.3f} | {a.after.slices['golden'].accuracy:.3f} | "
        f"{'pass' if a.verdict.passed else 'refused'} |\n" for a in attempts)
    return ("| attempt | recipe | CPU-s | USD | fresh acc | golden acc | gate |\n"
            "|---|---|---|---|---|---|---|\n" + rows)


@flow(name="update")
def update(window_start: str | None = None, window_end: str | None = None, labels_path: str | None = None,
           drift_run_id: str | None = None, gate_policy: str | None = None, reason: str | None = None,
           force: bool = False, model_name: str | None = None, episode_id: str | None = None) -> dict:
    """Fine-tune, evaluate against the champion, gate on quality and cost, promote on a pass.

    With neither a window nor a file it learns from the model's open drift
    episode: every label that arrived for it, however late, that no promoted
    update used. Too few is not a failure: the run completes with action
    ``wait for labels``, and the next check or label arrival tries again.

    One update per model runs at a time (a Prefect global concurrency limit
    named after the model: event-started updates and hand-run hotfixes queue
    behind each other), and a window or file that already paid for a
    fine-tune returns that run instead of a second one.

    Args:
        window_start: start of the drifted traffic window whose delayed labels to learn from.
        window_end: its end.
        labels_path: a CSV/Parquet/JSON file with ``text`` and ``label`` (hotfix): a path, file:// or
            s3:// URI; replaces the window.
        drift_run_id: the MLflow run of the drift check that triggered this update (lineage).
        gate_policy: a gate policy's name in ``refit/policies/`` (default ``REFIT_GATE_POLICY``); a run may not
            pass a file path, so it cannot weaken its own gate: the operator pins one with ``REFIT_GATE_POLICY``.
        reason: why this update runs (a hotfix's ticket, say); recorded on the run and the version.
        force: train even if this window or file already paid for a fine-tune (after changing the gate, say).
        model_name: which model (default ``REFIT_MODEL_NAME``); the drift event's trigger passes the event's.
        episode_id: the drift episode to learn from (default: the model's open one); the drift event passes it.
    """
    try:
        settings = settings_for(model_name)
    except RefitError as exc:
        return user_error(exc)
    try:
        with one_at_a_time(f"refit-update-{settings.model_name}"):
            return _update(settings, window_start, window_end, labels_path, drift_run_id, gate_policy, reason, force,
                           episode_id)
    except RefitError as exc:  # the slot never came free
        return user_error(exc)


@dataclass(frozen=True)
class Labelled:
    """What an update learns from: its rows and where they came from, or why it waits instead."""

    source: str = ""
    rows: pd.DataFrame | None = None
    trigger_key: str = ""
    episode: Episode | None = None
    wait: tuple[str, str] | None = None
    usable: int = 0
    unlabelled: tuple[str, ...] = ()  # the episode's served texts nobody labelled: pseudo-labels may use them


def gather_labels(ctx, policy, known_labels: list[str], labels_path: str | None, window_start: str | None,
                  window_end: str | None, episode_id: str | None) -> Labelled:
    """The update's labelled rows: a hand-supplied file (hotfix), one window, or the drift episode's labels."""
    name = ctx.model_name
    if labels_path:
        arrived = read_labelled_file(labels_path, ctx.settings)
        return Labelled(labels_path, arrived, f"{name}:file:{fingerprint(arrived)}")
    if window_start or window_end:
        if not (window_start and window_end):
            raise RefitError("give a whole window (window_start and window_end), a labelled file (labels_path), "
                             "or neither to learn from the open drift episode")
        start, end = parse_time(window_start), parse_time(window_end)
        arrived = labelled_window(ctx.store, name, start, end, known_labels=known_labels,
                                  max_label_mix_shift=policy.max_label_mix_shift)
        return Labelled(f"labelled requests {start.isoformat()} .. {end.isoformat()}", arrived,
                        f"{name}:window:{window_start}..{window_end}")
    episode = episodes.get_episode(episode_id) if episode_id else episodes.open_episode(ctx.experiment_id, name)
    if episode is None or not episode.is_open:
        why = f"drift episode {episode_id} is closed" if episode else f"model {name} has no open drift episode"
        return Labelled(episode=episode, wait=("none", f"{why}: nothing to learn"))
    since = labels_since(ctx.experiment_id, episode)
    rows = episode_labels(ctx.store, name, since, parse_time(None), known_labels, policy.max_label_mix_shift).rows
    counted = enough(rows, known_labels, policy, ctx.settings.seed)
    if not counted.ok:
        return Labelled(episode=episode, wait=("wait for labels", f"drift episode {episode.id}: {counted.reason}"))
    keys = hashlib.sha256("\n".join(sorted(rows["key"])).encode()).hexdigest()[:16]
    served = requestlog.read_inference(ctx.store, name, since, parse_time(None))["text"].astype(str)
    unlabelled = tuple(dict.fromkeys(served[~served.isin(set(rows["text"].astype(str)))]))
    return Labelled(f"drift episode {episode.id}: labelled requests since {since.isoformat()}", rows,
                    f"{name}:episode:{episode.id}:{keys}", episode, usable=counted.usable, unlabelled=unlabelled)


def _update(settings, window_start, window_end, labels_path, drift_run_id, gate_policy, reason, force,
            episode_id=None) -> dict:
    meters = StageMeters()  # the whole update, from its first label read to the alias move
    try:
        ctx = open_context(settings)
        name = ctx.model_name
        if labels_path:  # the operator's allow-list first, before anything is looked up or read
            check_source(labels_path, ctx.settings.allowed_label_sources(on_server=on_prefect_server()))
        closed = close_abandoned_updates(ctx.experiment_id, name, f"flow run {_flow_run_id()}",
                                         _flow_run_ended if on_prefect_server() else None)
        if closed:
            get_run_logger().warning(f"closed {len(closed)} update run(s) left running by a killed update "
                                     f"(marked KILLED in MLflow, charged): {', '.join(closed)}")
        repaired = versions.repair_deployed_tags(name)
        if repaired:
            get_run_logger().warning(f"tagged v{', v'.join(map(str, repaired))} deployed: a promotion had stopped "
                                     "after moving the alias")
        policy, policy_path = load_update_policy()
        rules, rules_path = load_gate_policy(chosen_gate_policy(gate_policy, settings))
        champion = versions.alias_version(name, versions.CHAMPION)
        if champion is None:
            raise RefitError(f"model {name} has no champion: run bootstrap first")
        golden = read_golden(ctx.store, name)
        champion_dir = versions.download_adapter(name, champion)
        known_labels = modeling.read_labels(champion_dir)
        _, pool = read_reference(ctx.store, name, champion)
        with meters.stage("labels"):
            labelled = gather_labels(ctx, policy, known_labels, labels_path, window_start, window_end, episode_id)
        if labelled.wait:
            get_run_logger().info(f"{labelled.wait[0]}: {labelled.wait[1]}")
            return {"action": labelled.wait[0], "promoted": False, "version": None, "champion": champion,
                    "reason": labelled.wait[1], "episode": labelled.episode.id if labelled.episode else None,
                    "attempts": []}
        source, arrived, trigger_key, episode = labelled.source, labelled.rows, labelled.trigger_key, labelled.episode
        drift_run_id = drift_run_id or (episode.opened_by if episode else None)  # a label arrival names none
        earlier = None if force else finished_update(ctx.experiment_id, name, trigger_key)
        if earlier is not None:
            why = (f"already updated for these labels by run {earlier.info.run_id} "
                   f"(against v{earlier.data.tags.get('refit.parent_version')}): not paying for a second "
                   "fine-tune; force=true trains anyway")
            get_run_logger().info(why)
            return {"promoted": False, "version": None, "champion": champion, "reason": why,
                    "duplicate_of": earlier.info.run_id, "attempts": []}
        with meters.stage("labels"):
            admitted = admit_new_labels(ctx.store, name, arrived, known_labels, policy.min_examples_per_new_label)
        if admitted.waiting:
            get_run_logger().info(f"{admitted.waiting} row(s) of new labels below min_examples_per_new_label wait "
                                  f"in quarantine: {'; '.join(admitted.reasons.values())[:500]}")
        data = prepare_update(admitted.rows, pool, golden.frame, known_labels, admitted.learned, policy, source,
                              ctx.settings.seed)
        with meters.stage("labels"):  # a new label's few rows lend their label to the texts clearly like them
            data = add_pseudo_labels(data, pool, champion_dir, labelled.unlabelled, policy, ctx.rates)
    except RefitError as exc:
        return user_error(exc)

    kind = "hotfix" if labels_path else "update"
    training = data.training
    start_dir = champion_dir
    if data.learned:  # the head grows by the new labels, each from its examples' prototype; every rung starts there
        with meters.stage("train"):
            start_dir = modeling.grow_head(champion_dir, data.learned,
                                           Path(tempfile.mkdtemp(prefix="refit-grown-")) / "a",
                                           examples=training.frame, seed=ctx.settings.seed)
        get_run_logger().info(f"learning {len(data.learned)} new label(s): {', '.join(data.learned)[:500]}")
    per_token = (measured_cpu_seconds_per_work_token(ctx.experiment_id, name) or policy.cpu_seconds_per_work_token)
    # The rest of the update (evaluation, gate, reference, cascade, deploy), from measured history: reserved too.
    overhead = ctx.rates.price(overhead_estimate_cpu_seconds(ctx.experiment_id, name))
    spent = month_spend(ctx.experiment_id, name, _month_start_ms())
    budget = ctx.settings.monthly_budget_usd
    full_frame = full_retrain_frame(pool, training, data.eval_texts)
    frames = {"warm": training.frame, "fresh": full_frame}
    tokenizer = modeling.load_tokenizer(champion_dir)
    tokens = {start: count_tokens(frame["text"].tolist(), tokenizer) for start, frame in frames.items()
              if any(r.start == start for r in policy.ladder)}  # tokenised once, priced per rung
    tags = {RUN_TYPE: "update", "refit.model": name, "refit.kind": kind, "refit.parent_version": str(champion),
            "refit.drift_run_id": drift_run_id or "none", "refit.data_source": source, "refit.reason": reason or kind,
            "refit.trigger_key": trigger_key, "refit.flow_run_id": _flow_run_id(), "refit.process": procs.identity()}
    # SIGTERM (Prefect turns it into an exception) stops the attempt at once: the run is closed KILLED, charged.
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name=kind, tags=tags) as run, \
            killed_charged(run.info.run_id, f"{kind} of {name}"):
        mlflow.log_params(flat_params("gate", rules) | {
            "ladder": " -> ".join(r.name for r in policy.ladder), "reason": reason or kind,
            "replay_ratio": policy.replay_ratio, "new_rows": training.new_rows, "replay_rows": training.replay_rows,
            "fresh_rows": len(data.fresh), "golden_rows": golden.rows, "golden_version": golden.version,
            "new_labels": len(data.learned), "new_label_rows_waiting": admitted.waiting,
            "new_label_rows_from_earlier": admitted.from_earlier,
            "duplicates_dropped": training.duplicates_dropped, "leaked_dropped": training.leaked_dropped,
            "train_fingerprint": training.fingerprint})
        log_policy(policy_path)
        log_policy(rules_path)
        log_training_input(training.frame, source, training.fingerprint)
        mlflow.log_metric("month_spend_before_usd", spent)
        attempts: list[Attempt] = []
        stop = f"no rung of the ladder takes {training.new_rows} new rows"
        for index, recipe in enumerate(policy.ladder, start=1):
            recipe = data.recipe(recipe, policy)
            if training.new_rows < recipe.min_new_rows:
                get_run_logger().info(f"rung {recipe.name} skipped: {training.new_rows} new rows, it needs "
                                      f"{recipe.min_new_rows}")
                continue
            work = recipe.work_tokens(tokens[recipe.start])
            estimate = ctx.rates.price(work * per_token)
            so_far = sum(a.trained.cost.usd for a in attempts)
            whole = estimate + overhead
            if index == 1:
                mlflow.log_metrics({"estimate_cost_usd": estimate, "estimate_whole_cost_usd": whole})
            # Reserved in the ledger before training, so an update running beside this one counts it.
            fits, with_it = reserve_budget(ctx.experiment_id, name, run.info.run_id, so_far + whole, budget,
                                           _month_start_ms())
            if not fits:
                stop = (f"refused before training: estimated ${whole:.4f} for the whole update would take this "
                        f"month's spend (${with_it - whole:.4f} with every reservation) past the budget ${budget:.2f}"
                        if index == 1 else
                        f"budget stops the ladder before {recipe.name}: estimated ${whole:.4f} on top of "
                        f"${with_it - whole:.4f} passes ${budget:.2f}")
                get_run_logger().info(stop)
                mlflow.set_tag("refit.ladder_stopped", stop)
                break
            attempts.append(run_attempt(ctx, index, recipe, frames[recipe.start], champion_dir, start_dir, data,
                                        rules, work, estimate, budget - (with_it - whole), meters))
            if attempts[-1].verdict.passed or not escalates([r.name for r in attempts[-1].verdict.failed], policy):
                break
        if not attempts:
            mlflow.set_tags({"refit.gate_verdict": "refused", "refit.gate_reasons": stop})
            mlflow.log_metric("update_cost_usd", 0.0)
            return {"promoted": False, "version": None, "champion": champion, "reason": stop,
                    "run_id": run.info.run_id, "attempts": []}
        final = attempts[-1]
        trained, verdict, before, after = final.trained, final.verdict, final.before, final.after
        total_cost = sum(a.trained.cost.usd for a in attempts)
        total_cpu = sum(a.trained.cost.cpu_seconds for a in attempts)
        mlflow.log_metrics(before.metrics("champion") | after.metrics("challenger") | {
            "update_cost_usd": total_cost, "train_cpu_seconds": total_cpu, "attempts": len(attempts),
            "gate_passed": float(verdict.passed), "new_labels": float(len(data.learned))})
        ladder_md = ladder_markdown(attempts)
        mlflow.log_text(verdict.html(f"Gate: {name} {kind} on v{champion}, attempt {final.index} "
                                     f"({final.recipe.name})"), "gate.html")
        mlflow.log_text(ladder_md, "ladder.md")
        log_json(verdict.to_dict(), "gate.json")
        mlflow.set_tags({"refit.gate_verdict": "passed" if verdict.passed else "refused",
                         "refit.gate_reasons": verdict.summary[:5000], "refit.final_attempt": final.recipe.name})
        with transaction():  # register, snapshot, promote: a failure after registering rolls back (tags the version)
            with meters.stage("register"):
                version = register_version(name, final.run_id, update_version_tags(
                    kind=kind, reason=reason, champion=champion, run_id=run.info.run_id, recipe=final.recipe.name,
                    attempts=len(attempts), source=source, training=training, data=data, golden=golden,
                    drift_run_id=drift_run_id, rules_path=rules_path, verdict=verdict, cost_usd=total_cost,
                    cpu_seconds=total_cpu, after=after, adapter_dir=trained.adapter_dir))
                faults.point("update.after_register")
            if verdict.passed:
                with meters.stage("reference"):
                    model = modeling.load_model(trained.adapter_dir)
                    reference_uri = write_reference(
                        ctx.store, name, version, model, tokenizer,
                        pool=pd.concat([pool, training.frame[training.frame.origin == "new"]]),
                        trained_on=frames[final.recipe.start], seed=ctx.settings.seed,
                        held_out=pd.concat([golden.frame[["text", "label"]], data.fresh[["text", "label"]]]))
                    versions.set_tags(name, version, {"refit.reference_uri": reference_uri})
                with meters.stage("cascade"):  # the cheap tier, gated as a unit, before the server is told
                    cascade(name, version, trained.adapter_dir, pool, arrived["text"].tolist(), data.sets, ctx.rates,
                            ctx.experiment_id, store=ctx.store, evaluation=after)
                with meters.stage("deploy"):  # under the lock: the fresh holdout joins the golden suite, the alias moves
                    promote_update(ctx.store, name, version, champion, data.fresh, policy.golden_max_per_label,
                                   f"{kind} run {run.info.run_id}")
                    if episode is not None:  # its labels are used now; later ones wait for the next episode
                        record_used(ctx.store, name, run.info.run_id, admitted.rows, data.fresh["text"])
                        episodes.close(episode.id, f"v{version} promoted, trained on its labels (update run "
                                                   f"{run.info.run_id})", f"v{version}")
            elif episode is not None:  # refused: the episode stays open and tries again once more labels arrived
                episodes.record_try(episode.id, labelled.usable)
        whole_cpu = meters.whole()  # the update's cost: every stage, not only the training
        mlflow.log_metrics(meters.metrics(ctx.rates) | {"update_cpu_seconds": whole_cpu,
                                                        "update_cost_usd": ctx.rates.price(whole_cpu)})
        result = {
            "kind": kind, "action": "update", "episode": episode.id if episode else None, "promoted": verdict.passed,
            "version": version, "parent_version": champion,
            "champion": version if verdict.passed else champion, "verdict": verdict.summary, "run_id": run.info.run_id,
            "attempts": [{"recipe": a.recipe.name, "passed": a.verdict.passed, "cpu_seconds": a.trained.cost.cpu_seconds,
                          "cost_usd": a.trained.cost.usd, "run_id": a.run_id} for a in attempts],
            "fresh_rows": len(data.fresh), "golden_rows": golden.rows, "golden_version": golden.version,
            "new_labels": len(data.learned), "labels_learned": data.learned,
            "fresh_accuracy_before": before.slices["fresh"].accuracy,
            "fresh_accuracy_after": after.slices["fresh"].accuracy,
            "golden_accuracy_before": before.slices["golden"].accuracy,
            "golden_accuracy_after": after.slices["golden"].accuracy,
            "cpu_seconds": whole_cpu, "cost_usd": ctx.rates.price(whole_cpu), "train_cpu_seconds": total_cpu,
            "train_cost_usd": total_cost, "stage_cpu_seconds": dict(meters.cpu),
            "estimate_cost_usd": attempts[0].estimate_usd,
        }
        log_json(result, "update.json")
    for attempt in attempts:  # every adapter is in MLflow now; the local copies are scratch
        shutil.rmtree(attempt.trained.adapter_dir, ignore_errors=True)
    if start_dir != champion_dir:
        shutil.rmtree(start_dir.parent, ignore_errors=True)
    create_markdown_artifact(f"# {kind.title()} of {name}: v{version} {'promoted' if verdict.passed else 'refused'}\n\n"
                             + verdict.markdown() + "\n" + ladder_md
                             + f"\nWhole update: {whole_cpu:.1f} CPU-s, ${ctx.rates.price(whole_cpu):.5f}; training "
                               f"{total_cpu:.1f} CPU-s, ${total_cost:.5f} in {len(attempts)} attempt(s); "
                               f"{training.new_rows} new + {training.replay_rows} replay rows; judged on "
                               f"{len(data.fresh)} fresh rows and golden suite v{golden.version} "
                               f"({golden.rows} rows).\n",
                             key="gate-verdict", description=f"{name} v{version}: {verdict.summary[:100]}")
    get_run_logger().info(f"{kind}: v{version} {'promoted to champion' if verdict.passed else 'refused'}: {verdict.summary}")
    return result
