"""bootstrap: train champion v1, register it, and snapshot its reference."""

from __future__ import annotations

import shutil

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.common import open_context, settings_for, user_error
from refit import modeling
from refit.errors import RefitError
from refit.evalsets import write_golden
from refit.scenario import build, load_scenario, load_source
from registry import versions
from registry.tracking import RUN_TYPE, flat_params, log_json, log_policy
from tasks.budget import killed_charged
from tasks.adopt import publish_base
from tasks.cascade import cascade
from tasks.deploy import first_version_tags, promote, write_reference
from tasks.evaluate import evaluate
from tasks.finetune import fine_tune, load_update_policy


def markdown_table(values: dict) -> str:
    return "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in values.items())

@flow(name="bootstrap")
def bootstrap(scenario: str | None = None, model_name: str | None = None) -> dict:
    """Train the first champion on the scenario's reference data.

    Registers it in MLflow with alias ``champion`` and writes the reference
    snapshot and a new version of the golden suite (the scenario's held-out
    test rows of the groups v1 knows) to the object store.
    """
    try:
        settings = settings_for(model_name)
        spec, spec_path = load_scenario(scenario or settings.scenario)
        data = build(spec, load_source(spec.source, settings.data_dir))
        ctx = open_context(settings)
        policy, policy_path = load_update_policy()
    except RefitError as exc:
        return user_error(exc)

    name = ctx.model_name
    tags = {RUN_TYPE: "bootstrap", "refit.model": name, "refit.scenario": spec.name}
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name="bootstrap", tags=tags) as run, \
            killed_charged(run.info.run_id, "bootstrap", charge=False):
        mlflow.log_params(flat_params("recipe", policy.bootstrap) | {"scenario": spec.name, "train_rows": len(data.train),
                                                                    "labels": len(data.labels)})
        log_policy(policy_path)
        log_policy(spec_path, "scenario")
        golden = write_golden(ctx.store, name, data.golden)
        trained = fine_tune(data.train, policy.bootstrap, ctx.rates, labels=data.labels, seed=ctx.settings.seed)
        publish_base(trained.adapter_dir)  # a REFIT_BASE_MODEL checkpoint is stored in the run, found again by hash
        mlflow.log_artifacts(str(trained.adapter_dir), versions.ADAPTER_DIR)
        evaluation = evaluate(trained.adapter_dir, {"golden": golden.frame}, ctx.rates, store=ctx.store, model_name=name)
        mlflow.log_metrics(trained.cost.metrics() | evaluation.metrics("champion"))
        version = versions.register(name, run.info.run_id, first_version_tags(
            data.train, golden, trained, policy_path, evaluation.slices["golden"].accuracy, len(data.labels)))
        model = modeling.load_model(trained.adapter_dir)
        reference_uri = write_reference(ctx.store, name, version, model, modeling.load_tokenizer(trained.adapter_dir),
                                        pool=data.train, trained_on=data.train, seed=ctx.settings.seed,
                                        held_out=golden.frame, answers=evaluation.answers)
        versions.set_tags(name, version, {"refit.reference_uri": reference_uri})
        cascade(name, version, trained.adapter_dir, data.train, [], {"golden": golden.frame}, ctx.rates,
                ctx.experiment_id, store=ctx.store, evaluation=evaluation)  # the cheap tier, gated before it serves
        promote(name, version, versions.alias_version(name, versions.CHAMPION))
        result = {"version": version, "run_id": run.info.run_id, "reference_uri": reference_uri,
                  "golden_accuracy": evaluation.slices["golden"].accuracy, "golden_rows": golden.rows,
                  "golden_version": golden.version, "labels": len(data.labels),
                  "train_cpu_seconds": trained.cost.cpu_seconds, "train_cost_usd": trained.cost.usd}
        log_json(result, "bootstrap.json")
    shutil.rmtree(trained.adapter_dir, ignore_errors=True)  # in MLflow now; the local copy is scratch
    create_markdown_artifact(f"# Bootstrap: {name} v{version} is champion\n\n" + markdown_table(result),
                             key="bootstrap", description=f"{name} v{version}")
    return result
