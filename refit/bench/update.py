"""Update-cost benchmark: the incremental update against a full retrain, side by side.

On the default scenario (``refit/scenarios/clinc-shift.yaml``) in one process:

1. the champion is trained from the base model with the bootstrap recipe;
2. the delayed labels of the shifted window arrive (its labelled share); a
   fresh holdout of them is kept aside, as the update flow does;
3. **incremental**: the update ladder of ``refit/policies/update.yaml`` runs as
   the ``update`` flow runs it, rung by rung, each attempt gated against the
   champion with ``refit/policies/gate.yaml``, until one passes; its CPU-seconds
   are those of every attempt made;
4. **full retrain**: a fresh adapter over the base on all data so far (the
   champion's training data plus the new labels), with the bootstrap recipe.

Each side then pays what the update flow pays after training, metered per
stage (``refit.cost.StageMeters``): evaluation against the champion on the
flow's judging sets, the gate, registration in a scratch MLflow store, the
reference snapshot and the cascade. Their sum is the side's
``flow_cpu_seconds``, from labelled rows to a gated, registered version with
its cascade and reference; ``cpu_seconds`` stays the training alone.

As in the flows, the champion is judged on golden and its cascade built
when it is registered (``tasks.evaluate.score_models`` and
``tasks.cascade.build`` on the served champion, over its training pool, the
golden set kept out), and the encoder states their passes return are kept
(``refit.runtime.encoder_states``) in a scratch store: the update's ``head``
rung reads them for the replay rows they cover, and its evaluation for the
golden set, inside their metered time. Both run at every promotion anyway;
they are not counted here, and their CPU-seconds are reported beside the
table (``cascade_build_cpu_seconds``).

Every model is scored on the same golden set, the fresh holdout (which the
gate judges, as in the flow) and the scenario's shifted test texts (reported
as ``shifted_accuracy``, never judged on, and scored once the side's flow is
metered: no flow scores a scenario's test set). CPU-seconds are
the training process's user+system time (``refit.cost.Meter``). Artifact
bytes are the saved adapter directory against the base model's weights file.

This module sits in ``refit/`` beside the CLI that runs it, but measures
``tasks``: it imports them (and with them Prefect) only inside functions.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

SCENARIO = "clinc-shift"
MODEL = "benchmark"
TARGETS = {  # what the incremental update must reach against a full retrain
    "cpu_ratio_max": 0.10,
    "flow_cpu_ratio_max": 0.15,
    "shifted_ratio_min": 0.98,
    "golden_drop_points_max": 1.0,
    "artifact_share_max": 0.02,
}

Progress = Callable[[str], None]


def _scored(bench: _Bench, evaluation, cpu_seconds: float, adapter_dir: Path) -> dict:
    """One trained model's figures; its shifted accuracy is scored here, for the report, outside every meter."""
    from tasks.evaluate import artifact_bytes, score_models

    shifted = score_models({"model": adapter_dir}, {"shifted": bench.shifted}, bench.rates)["model"]
    return {"cpu_seconds": round(cpu_seconds, 2),
            "shifted_accuracy": round(shifted.slices["shifted"].accuracy, 4),
            "golden_accuracy": round(evaluation.slices["golden"].accuracy, 4),
            "artifact_bytes": artifact_bytes(adapter_dir)}


def _champion_states(adapter_dir: Path, pool: pd.DataFrame, golden: pd.DataFrame, rates, made: list[Path]):
    """Judge the champion on golden and build its cascade as bootstrap does, keeping the encoder states of both.

    Returns the states (``EncoderStates``), the rows kept, the CPU-seconds of
    both and the scratch store.
    """
    import tempfile

    from refit.cost import Meter
    from refit.runtime.encoder_states import EncoderStates
    from refit.store import LocalStore
    from tasks.cascade import build, keep_states, load_cascade_policy
    from tasks.evaluate import load_served_models, score_models

    root = Path(tempfile.mkdtemp(prefix="refit-bench-states-"))
    made.append(root)
    store = LocalStore(root)
    with Meter() as meter:
        sets = {"golden": golden}
        evaluation = score_models({"champion": adapter_dir}, sets, rates, store, MODEL)["champion"]
        champion = load_served_models({"champion": adapter_dir})["champion"]
        built = build(champion, pool["text"].tolist(), [], sets, load_cascade_policy()[0], evaluation=evaluation,
                      adapter_dir=adapter_dir)
        kept = keep_states(store, MODEL, adapter_dir, built)
    return EncoderStates.of(store, MODEL, adapter_dir), kept, meter.cpu_seconds, store


@contextmanager
def _scratch_registry(root: Path):
    """A throwaway MLflow store (SQLite) where each side registers its version, as the flow does; restored after."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow.create_experiment("bench-update-cost", artifact_location=(root / "artifacts").as_uri())
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def _ship(side: str, bench: _Bench, adapter_dir: Path, trained_on: pd.DataFrame, evaluation, meters) -> None:
    """What the flow does after the gate for one side, metered per stage: register, reference, cascade."""
    import mlflow

    from refit import modeling
    from registry import versions
    from tasks.cascade import cascade
    from tasks.deploy import register_version, write_reference

    with meters.stage("register"):
        with mlflow.start_run(experiment_id=bench.experiment_id, run_name=side) as run:
            mlflow.log_artifacts(str(adapter_dir), versions.ADAPTER_DIR)
        version = register_version.fn(MODEL, run.info.run_id, {"refit.kind": side})
    with meters.stage("reference"):
        write_reference.fn(bench.store, MODEL, version, modeling.load_model(adapter_dir),
                           modeling.load_tokenizer(adapter_dir), pool=pd.concat([bench.pool, bench.new_rows]),
                           trained_on=trained_on, seed=bench.seed, held_out=bench.held_out,
                           answers=evaluation.answers)
    with meters.stage("cascade"):
        cascade.fn(MODEL, version, adapter_dir, bench.pool, bench.new["text"].tolist(), bench.update.sets,
                   bench.rates, bench.experiment_id, store=bench.store, evaluation=evaluation)


def _judge(bench: _Bench, adapter_dir: Path, cost_usd: float, meters):
    """Evaluate against the champion on the flow's sets (kept encoder states where they apply), then gate."""
    from tasks.evaluate import evaluate_pair
    from tasks.gate import decide

    with meters.stage("evaluate"):
        before, after = evaluate_pair.fn(bench.champion_dir, adapter_dir, bench.update.sets, bench.rates,
                                         store=bench.store, model_name=MODEL)
    with meters.stage("gate"):
        verdict = decide(before, after, cost_usd, bench.rules)
    return before, after, verdict


def _incremental(bench: _Bench, policy, full: pd.DataFrame, progress: Progress) -> dict:
    """The ladder as the update flow climbs it, then its version shipped; every stage metered."""
    from refit.cost import StageMeters
    from tasks.finetune import escalates, train_adapter

    meters, attempts, judged = StageMeters(), [], []
    training = bench.update.training
    for recipe in policy.ladder:
        warm = recipe.start == "warm"
        frame = training.frame if warm else full
        progress(f"incremental: {recipe.name} on {len(frame):,} rows")
        with meters.stage("train"):
            trained = train_adapter(frame, recipe, bench.rates, labels=bench.labels, seed=bench.seed,
                                    warm_start=bench.champion_dir if warm else None,
                                    states=bench.states if warm else None)
        bench.made.append(trained.adapter_dir)
        before, after, verdict = _judge(bench, trained.adapter_dir, trained.cost.usd, meters)
        bench.champion_eval = bench.champion_eval or before
        judged.append((trained, after, {"recipe": recipe.name, "rows": len(frame), "gate": verdict.summary,
                                        "passed": verdict.passed}))
        if verdict.passed or not escalates([r.name for r in verdict.failed], policy):
            break
    progress("incremental: register, reference and cascade, as the flow ships it")
    _ship("incremental", bench, trained.adapter_dir, frame, after, meters)
    flow_cpu_seconds = meters.whole()
    attempts = [_scored(bench, after, t.cost.cpu_seconds, t.adapter_dir) | facts for t, after, facts in judged]
    final = attempts[-1]
    return {k: final[k] for k in ("shifted_accuracy", "golden_accuracy", "artifact_bytes")} | {
        "cpu_seconds": round(sum(a["cpu_seconds"] for a in attempts), 2), "recipe": final["recipe"],
        "gate_passed": final["passed"], "attempts": attempts, "flow_cpu_seconds": round(flow_cpu_seconds, 2),
        "stage_cpu_seconds": {k: round(v, 2) for k, v in meters.cpu.items()}}


def _full_retrain(bench: _Bench, policy, full: pd.DataFrame, progress: Progress) -> dict:
    """A fresh adapter over the base on everything so far, judged and shipped through the same stages."""
    from refit.cost import StageMeters
    from tasks.finetune import train_adapter

    meters = StageMeters()
    progress(f"full retrain: bootstrap recipe on {len(full):,} rows")
    with meters.stage("train"):
        retrain = train_adapter(full, policy.bootstrap, bench.rates, labels=bench.labels, seed=bench.seed)
    bench.made.append(retrain.adapter_dir)
    _, after, verdict = _judge(bench, retrain.adapter_dir, retrain.cost.usd, meters)
    progress("full retrain: register, reference and cascade, as the flow ships it")
    _ship("full-retrain", bench, retrain.adapter_dir, full, after, meters)
    flow_cpu_seconds = meters.whole()
    return _scored(bench, after, retrain.cost.cpu_seconds, retrain.adapter_dir) | {
        "gate_passed": verdict.passed, "flow_cpu_seconds": round(flow_cpu_seconds, 2),
        "stage_cpu_seconds": {k: round(v, 2) for k, v in meters.cpu.items()}}


@dataclass
class _Bench:
    """What both sides share: the champion, its kept states, the new labels and the flow's judging sets."""

    rates: object
    rules: object
    seed: int
    labels: list[str]
    pool: pd.DataFrame
    new: pd.DataFrame
    update: object  # tasks.finetune.UpdateData
    shifted: pd.DataFrame
    held_out: pd.DataFrame
    made: list[Path] = field(default_factory=list)
    champion_dir: Path | None = None
    states: object = None
    store: object = None
    experiment_id: str = ""
    champion_eval: object = None
    champion_shifted: float = 0.0

    @property
    def new_rows(self) -> pd.DataFrame:
        """The new labelled rows the update trains on (the flow's reference pool grows by these)."""
        frame = self.update.training.frame
        return frame[frame.origin == "new"]


def run_benchmark(data_dir: Path, scenario: str = SCENARIO, update_policy: str = "update", gate_policy: str = "gate",
                  progress: Progress = lambda what: None) -> dict:
    import tempfile

    from refit.cost import Rates
    from refit.data import text_hashes
    from refit.scenario import build, load_scenario, load_source
    from refit.settings import Settings
    from tasks.evaluate import score_models
    from tasks.finetune import full_retrain_frame, load_update_policy, prepare_update, train_adapter
    from tasks.gate import load_gate_policy

    settings = Settings(data_dir=data_dir)
    policy, _ = load_update_policy(update_policy)
    spec, _ = load_scenario(scenario)
    data = build(spec, load_source(spec.source, data_dir))
    shift = data.shifts[0]
    new = shift.window.sample(frac=shift.labelled_share, random_state=spec.seed + 1)
    # As the flow: a fresh holdout of the new labels judges improvement, golden judges regression. The
    # scenario's shifted test texts are scored for this report only.
    update = prepare_update(new, data.train, data.golden, data.labels, [], policy, "benchmark", spec.seed)
    bench = _Bench(Rates(settings.cpu_usd_per_hour, settings.gpu_usd_per_hour), load_gate_policy(gate_policy)[0],
                   spec.seed, data.labels, data.train, new, update, shift.external,
                   pd.concat([data.golden[["text", "label"]], update.fresh[["text", "label"]]]))
    full = full_retrain_frame(data.train, update.training, update.eval_texts | text_hashes(shift.external["text"]))
    root = Path(tempfile.mkdtemp(prefix="refit-bench-update-"))
    bench.made.append(root)
    try:
        with _scratch_registry(root) as bench.experiment_id:
            progress(f"champion: bootstrap recipe on {len(data.train):,} rows")
            champion = train_adapter(data.train, policy.bootstrap, bench.rates, labels=data.labels, seed=spec.seed)
            bench.champion_dir = champion.adapter_dir
            bench.made.append(champion.adapter_dir)
            bench.champion_shifted = score_models({"model": champion.adapter_dir}, {"shifted": shift.external},
                                                  bench.rates)["model"].slices["shifted"].accuracy
            progress("champion's evaluation and cascade, as bootstrap runs them (keeps their encoder states)")
            bench.states, kept, cascade_cpu, bench.store = _champion_states(champion.adapter_dir, data.train,
                                                                            data.golden, bench.rates, bench.made)
            incremental = _incremental(bench, policy, full, progress)
            full_retrain = _full_retrain(bench, policy, full, progress)
    finally:
        for path in bench.made:
            shutil.rmtree(path, ignore_errors=True)
    return _result(spec.name, bench, champion, kept, cascade_cpu, len(full), incremental, full_retrain)


def _result(scenario: str, bench: _Bench, champion, kept: int, cascade_cpu: float, full_rows: int, incremental: dict,
            full_retrain: dict) -> dict:
    import torch

    from refit import modeling

    model_bytes = (modeling.base_model_path() / "model.safetensors").stat().st_size
    champion_golden = round(bench.champion_eval.slices["golden"].accuracy, 4)
    ratios = {
        "cpu_ratio": round(incremental["cpu_seconds"] / full_retrain["cpu_seconds"], 4),
        "flow_cpu_ratio": round(incremental["flow_cpu_seconds"] / full_retrain["flow_cpu_seconds"], 4),
        "shifted_ratio": round(incremental["shifted_accuracy"] / full_retrain["shifted_accuracy"], 4),
        "golden_drop_points": round(100 * (champion_golden - incremental["golden_accuracy"]), 2),
        "artifact_share": round(incremental["artifact_bytes"] / model_bytes, 4),
    }
    met = {
        "cpu_ratio": ratios["cpu_ratio"] <= TARGETS["cpu_ratio_max"],
        "flow_cpu_ratio": ratios["flow_cpu_ratio"] <= TARGETS["flow_cpu_ratio_max"],
        "shifted_ratio": ratios["shifted_ratio"] >= TARGETS["shifted_ratio_min"],
        "golden_drop_points": ratios["golden_drop_points"] <= TARGETS["golden_drop_points_max"],
        "artifact_share": ratios["artifact_share"] <= TARGETS["artifact_share_max"],
    }
    return {
        "scenario": scenario, "torch_threads": torch.get_num_threads(), "new_rows": bench.update.training.new_rows,
        "replay_rows": bench.update.training.replay_rows, "full_retrain_rows": full_rows,
        "champion_cpu_seconds": round(champion.cost.cpu_seconds, 2), "encoder_states_kept": kept,
        "cascade_build_cpu_seconds": round(cascade_cpu, 2),
        "champion_shifted_accuracy": round(bench.champion_shifted, 4),
        "champion_golden_accuracy": champion_golden, "model_bytes": model_bytes,
        "incremental": incremental, "full_retrain": full_retrain, "ratios": ratios, "targets": TARGETS, "met": met,
    }


def tables(result: dict) -> list:
    from rich.table import Table

    runs = Table(title=f"Update cost, scenario {result['scenario']}: {result['new_rows']:,} new + "
                       f"{result['replay_rows']:,} replay rows vs {result['full_retrain_rows']:,} for a full retrain")
    for column in ("model", "CPU-s", "shifted acc", "golden acc", "artifact bytes", "gate"):
        runs.add_column(column, justify="left" if column in ("model", "gate") else "right")
    runs.add_row("champion (before)", f"{result['champion_cpu_seconds']:.1f}", f"{result['champion_shifted_accuracy']:.3f}",
                 f"{result['champion_golden_accuracy']:.3f}", "", "")
    runs.add_row(f"  champion's evaluation and cascade build (not counted: they run at every promotion; kept "
                 f"{result['encoder_states_kept']:,} encoder states)", f"{result['cascade_build_cpu_seconds']:.1f}",
                 "", "", "", "")
    for a in result["incremental"]["attempts"]:
        runs.add_row(f"  attempt: {a['recipe']}", f"{a['cpu_seconds']:.1f}", f"{a['shifted_accuracy']:.3f}",
                     f"{a['golden_accuracy']:.3f}", f"{a['artifact_bytes']:,}", "pass" if a["passed"] else "refused")
    inc, full = result["incremental"], result["full_retrain"]
    runs.add_row("incremental (all attempts)", f"{inc['cpu_seconds']:.1f}", f"{inc['shifted_accuracy']:.3f}",
                 f"{inc['golden_accuracy']:.3f}", f"{inc['artifact_bytes']:,}", "")
    runs.add_row("full retrain", f"{full['cpu_seconds']:.1f}", f"{full['shifted_accuracy']:.3f}",
                 f"{full['golden_accuracy']:.3f}", "", "pass" if full["gate_passed"] else "refused")

    flows = Table(title="The whole update as the flow runs it: labelled rows to a gated, registered version with "
                        "its reference and cascade (CPU-s per stage)")
    stages = list(dict.fromkeys([*inc["stage_cpu_seconds"], *full["stage_cpu_seconds"]]))
    for column in ("side", *stages, "whole"):
        flows.add_column(column, justify="left" if column == "side" else "right")
    for side, figures in (("incremental", inc), ("full retrain", full)):
        flows.add_row(side, *(f"{figures['stage_cpu_seconds'].get(s, 0.0):.1f}" for s in stages),
                      f"{figures['flow_cpu_seconds']:.1f}")

    ratios = Table(title="Incremental against the targets")
    for column in ("measure", "value", "target", "met"):
        ratios.add_column(column)
    r, t, m = result["ratios"], result["targets"], result["met"]
    ratios.add_row("CPU-s, incremental / full retrain", f"{r['cpu_ratio']:.3f}", f"<= {t['cpu_ratio_max']}",
                   str(m["cpu_ratio"]))
    ratios.add_row("whole-flow CPU-s, incremental / full retrain", f"{r['flow_cpu_ratio']:.3f}",
                   f"<= {t['flow_cpu_ratio_max']}", str(m["flow_cpu_ratio"]))
    ratios.add_row("shifted accuracy, incremental / full retrain", f"{r['shifted_ratio']:.3f}",
                   f">= {t['shifted_ratio_min']}", str(m["shifted_ratio"]))
    ratios.add_row("golden accuracy, points below the champion", f"{r['golden_drop_points']:.2f}",
                   f"<= {t['golden_drop_points_max']}", str(m["golden_drop_points"]))
    ratios.add_row("adapter bytes / base model bytes", f"{r['artifact_share']:.4f}", f"<= {t['artifact_share_max']}",
                   str(m["artifact_share"]))
    return [runs, flows, ratios]
