"""MLflow tracking: where runs go, and the facts every run records.

Nothing here runs at import time; ``configure`` is called by each flow with
its settings, so tests and production point the same code at different stores.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from refit.settings import PROJECT_ROOT, Settings

RUN_TYPE = "refit.run_type"


def configure(settings: Settings) -> str:
    """Point MLflow at the settings' store and return the experiment id.

    The experiment is created with its artifact location beside the object
    store (a local directory or ``s3://bucket/mlflow-artifacts``).
    """
    settings.apply_environment()
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(settings.mlflow_experiment, artifact_location=settings.artifact_location)


def code_revision() -> str:
    """The git commit of the running code, or the package version outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from refit import __version__

        return f"refit-{__version__}"


def log_json(obj, artifact_file: str) -> None:
    mlflow.log_text(json.dumps(obj, indent=2, default=str), artifact_file)


def log_policy(path: Path, artifact_dir: str = "policies") -> None:
    """Every run logs the policy files it used, so a decision can be replayed."""
    mlflow.log_artifact(str(path), artifact_dir)


def flat_params(prefix: str, obj) -> dict[str, str]:
    """A pydantic model or dict flattened to MLflow params (``gate.min_improvement``)."""
    data = obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flat_params(name, value))
        else:
            out[name] = str(value)[:500]
    return out


def charge_killed_update(run_id: str, why: str) -> tuple[float, list[str]]:
    """Close an update run stopped mid-way (SIGTERM, or found abandoned) as KILLED, charged.

    Returns the charge and the attempt runs it closed.

    The charge is what its finished attempts cost plus the reservation of the
    attempt that never finished: the machine time was spent, whatever became
    of it. Its attempt runs still open are closed KILLED too.
    """
    client = MlflowClient()
    run = client.get_run(run_id)
    attempts = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    finished = sum(a.data.metrics.get("update_cost_usd", 0.0) for a in attempts if a.info.status == "FINISHED")
    metrics = run.data.metrics
    # The reservation covers finished attempts too (it is their cost plus the open rung's estimate).
    charge = metrics.get("update_cost_usd", max(metrics.get("reserved_usd", 0.0),
                                                finished + metrics.get("estimate_cost_usd", 0.0)))
    closed = [attempt.info.run_id for attempt in attempts if attempt.info.status != "FINISHED"]
    for attempt_id in closed:
        client.set_tag(attempt_id, "refit.abandoned", why)
        client.set_terminated(attempt_id, status="KILLED")
    client.set_tag(run_id, "refit.abandoned", why)
    client.log_metric(run_id, "update_cost_usd", charge)
    client.set_terminated(run_id, status="KILLED")
    return charge, closed


def last_checked_window_end(experiment_id: str, model_name: str) -> str | None:
    """End of the newest window a drift check has measured (ISO), for incremental windows."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_TYPE}` = 'drift-check' and tags.`refit.model` = '{model_name}'",
        max_results=200,
    )
    window_ends = [r.data.tags["refit.window_end"] for r in runs if "refit.window_end" in r.data.tags]
    return max(window_ends) if window_ends else None


def measured_cpu_seconds_per_work_token(experiment_id: str, model_name: str, newest: int = 5) -> float | None:
    """Measured training throughput: median CPU-seconds per work token of the newest attempts.

    Work tokens count a warm start's cached forward pass and its unfrozen
    depth (``Recipe.work_tokens``), so cheap and deep attempts share one rate.
    """
    import statistics

    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.`{RUN_TYPE}` = 'update-attempt' and tags.`refit.model` = '{model_name}' "
                       "and metrics.train_work_tokens > 0"),
        order_by=["attributes.start_time DESC"],
        max_results=newest,
    )
    rates = [r.data.metrics["train_cpu_seconds"] / r.data.metrics["train_work_tokens"] for r in runs
             if "train_cpu_seconds" in r.data.metrics]
    return statistics.median(rates) if rates else None


def log_training_input(frame, source: str, fingerprint: str) -> None:
    """Record the training set as the run's MLflow dataset input (lineage)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "source can be interpreted in multiple ways"
        dataset = mlflow.data.from_pandas(frame, source=source, name=f"train-{fingerprint}")
    mlflow.log_input(dataset, context="training")


def finished_update(experiment_id: str, model_name: str, trigger_key: str):
    """The update run that already trained for ``trigger_key`` (a window or a file), if any.

    A duplicated scheduled run or a replayed event finds it and stops before
    paying for a second fine-tune, even when it was queued behind the first
    and the champion has moved on since (the new champion learned that data).
    Runs refused before training (budget) and runs that never finished
    (killed) do not count: the same data may be tried again.
    """
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.`{RUN_TYPE}` = 'update' and tags.`refit.model` = '{model_name}' "
                       f"and tags.`refit.trigger_key` = '{trigger_key}' and metrics.attempts >= 1 "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    return runs[0] if runs else None


def abandoned_runs(experiment_id: str, model_name: str, run_type: str,
                   flow_run_ended: Callable[[str], bool] | None = None) -> list:
    """Runs of ``run_type`` still RUNNING in MLflow whose process is over: stopped from outside (SIGKILL, a lost worker).

    Over means the process that ran it (tag ``refit.process``, on this host)
    is gone, or its flow run (tag ``refit.flow_run_id``) has ended on the
    Prefect server ``flow_run_ended`` asks. A run neither can judge
    (another host's, on no server) is not returned.
    """
    from refit import processes

    def ended(run) -> bool:
        if processes.gone(run.data.tags.get("refit.process", "")):
            return True
        flow_run_id = run.data.tags.get("refit.flow_run_id")
        return bool(flow_run_ended and flow_run_id and flow_run_id != "none" and flow_run_ended(flow_run_id))

    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.`refit.model` = '{model_name}' and tags.`{RUN_TYPE}` = '{run_type}' "
                       "and attributes.status = 'RUNNING'"), max_results=500,
    )
    return [run for run in runs if ended(run)]


def close_abandoned_updates(experiment_id: str, model_name: str, found_by: str,
                            flow_run_ended: Callable[[str], bool] | None = None) -> list[str]:
    """Mark update runs of ``model_name`` left RUNNING by an update that is over as KILLED, charged.

    Returns the ids of the runs closed: each update and its attempts.

    Which runs are over: ``abandoned_runs``. The abandoned update promoted nothing
    (promotion is its last step) and does not count as a duplicate; it is
    charged its finished attempts plus its reservation (``charge_killed_update``).
    """
    closed = []
    for run in abandoned_runs(experiment_id, model_name, "update", flow_run_ended):
        _, attempts = charge_killed_update(run.info.run_id, "left running by an update that stopped without "
                                                            f"finishing (killed); closed by {found_by}")
        closed += [run.info.run_id, *attempts]
    return closed
