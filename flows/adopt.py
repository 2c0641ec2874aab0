"""adopt: make champion v1 from a team's own data, golden set and (optionally) model."""

from __future__ import annotations

import shutil

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.common import open_context, user_error
from refit import faults, modeling, processes
from refit.errors import RefitError
from refit.evalsets import write_golden
from refit.settings import Settings
from registry import versions
from registry.tracking import RUN_TYPE, flat_params, log_json, log_policy
from tasks.adopt import (adopted_version_tags, adoption_result, first_adapter, golden_quality, log_golden_quality,
                         prepare_adoption, publish_base, retire_unfinished, unfinished_adoption)
from tasks.cascade import cascade
from tasks.deploy import promote, write_reference
from tasks.finetune import load_update_policy


@flow(name="adopt")
def adopt(train_path: str, golden_path: str | None = None, model_path: str | None = None,
          text_column: str = "text", label_column: str = "label") -> dict:
    """Register champion v1 from what a team has, with no scenario.

    With ``model_path`` (a transformers sequence-classification checkpoint)
    v1 is that model as it is, its weights the base of every later adapter;
    without it, v1 is trained on ``train_path`` from the configured base with
    the bootstrap recipe. ``train_path`` is the replay pool either way. The
    golden suite is ``golden_path``, else 15% of ``train_path`` per label,
    never trained on.

    An adopt that stopped after registering its version (no champion yet)
    is replaced by the next one: its version is tagged abandoned, the golden
    suite it wrote is reused when the rows are the same, and the new version
    becomes the champion.
    """
    try:
        settings = Settings()
        adoption = prepare_adoption(train_path, golden_path, model_path, text_column, label_column, settings.seed)
        ctx = open_context(settings)
        policy, policy_path = load_update_policy()
        stopped = unfinished_adoption(ctx.model_name)
    except RefitError as exc:
        return user_error(exc)

    name, recipe = ctx.model_name, policy.bootstrap
    tags = {RUN_TYPE: "adopt", "refit.model": name, "refit.process": processes.identity()}
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name="adopt", tags=tags) as run:
        retire_unfinished(name, stopped, run.info.run_id)
        mlflow.log_params(flat_params("recipe", recipe) | {
            "train_rows": len(adoption.train), "golden_rows": len(adoption.golden), "labels": len(adoption.labels),
            "adopted_model": str(adoption.checkpoint or "none"), "train_source": adoption.train_source,
            "golden_source": adoption.golden_source})
        log_policy(policy_path)
        adapter_dir, cost = first_adapter(adoption, recipe, ctx)
        base = publish_base(adapter_dir)
        mlflow.log_artifacts(str(adapter_dir), versions.ADAPTER_DIR)
        golden = write_golden(ctx.store, name, adoption.golden)
        quality, groups, runtime = golden_quality(adapter_dir, golden.frame, ctx.settings.serve_runtime)
        log_golden_quality(quality, groups, cost)
        version = versions.register(name, run.info.run_id, adopted_version_tags(adoption, base, golden, policy_path,
                                                                                quality, cost))
        faults.point("adopt.after_register")
        model = modeling.load_model(adapter_dir)
        reference_uri = write_reference(ctx.store, name, version, model, modeling.load_tokenizer(adapter_dir),
                                        pool=adoption.train, trained_on=adoption.train, seed=ctx.settings.seed,
                                        held_out=golden.frame)
        versions.set_tags(name, version, {"refit.reference_uri": reference_uri})
        cascade(name, version, adapter_dir, adoption.train, [], {"golden": golden.frame}, ctx.rates,
                ctx.experiment_id, store=ctx.store)  # the cheap tier, gated as a unit before the server is told
        with versions.promotion_lock(ctx.store, name, f"adopt run {run.info.run_id}") as lease:
            promote(name, version, None, lease=lease)  # a new model: any champion is another adopt's
        result = adoption_result(name, version, adoption, base, quality, golden, runtime, run.info.run_id,
                                 reference_uri, cost)
        log_json(result, "adopt.json")
    shutil.rmtree(adapter_dir, ignore_errors=True)  # in MLflow now; the local copy is scratch
    create_markdown_artifact(f"# Adopt: {name} v{version} is champion\n\n| | |\n|---|---|\n"
                             + "".join(f"| {k} | {v} |\n" for k, v in result.items()),
                             key="adopt", description=f"{name} v{version}")
    return result
