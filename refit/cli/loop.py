"""The loop's commands: demo, bootstrap, adopt, monitor, update, rollback, report and ui."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from refit.settings import OFFLINE_ENV
from refit.cli.common import JsonOption, ModelNameOption, StoreOption, _emit, _prepare, _run_flow, app, err



def _check_scenario(scenario: str, settings) -> None:
    """A scenario that does not load, or whose data is not there, is named at once: before the flow starts."""
    from refit.scenario import check_source, load_scenario

    check_source(load_scenario(scenario)[0].source, settings.data_dir)


@app.command()
def demo(store: StoreOption = None, scenario: Annotated[Optional[str], typer.Option(help="Scenario name or YAML path.")] = None,
         model_name: ModelNameOption = None, as_json: JsonOption = False) -> None:
    """Run the whole loop on the default scenario: bootstrap, no-drift, shift, update, poisoned hotfix.

    Example: refit demo --json
    """
    settings = _prepare(store, model_name)
    _check_scenario(scenario or settings.scenario, settings)
    from flows.demo import demo as demo_flow

    result = _run_flow(demo_flow, scenario=scenario)
    stage_table = Table(title="Stage timings")
    stage_table.add_column("stage")
    stage_table.add_column("seconds", justify="right")
    for stage, seconds in result["stage_seconds"].items():
        stage_table.add_row(stage, f"{seconds:.1f}")
    stage_table.add_row("total", f"{sum(result['stage_seconds'].values()):.1f}")
    (err if as_json else Console()).print(stage_table)
    _emit(result, as_json, "Demo result")
    if not as_json:
        from refit.secrets import mask_uri

        Console().print(f"Review it: refit ui --port 5000   (MLflow store {mask_uri(settings.tracking_uri)})")


@app.command()
def bootstrap(store: StoreOption = None, scenario: Annotated[Optional[str], typer.Option(help="Scenario name or YAML path.")] = None,
              model_name: ModelNameOption = None, as_json: JsonOption = False) -> None:
    """Train champion v1 from the scenario and register it.

    Example: refit bootstrap --scenario clinc-shift
    """
    settings = _prepare(store, model_name)
    _check_scenario(scenario or settings.scenario, settings)
    from flows.bootstrap import bootstrap as flow_fn

    _emit(_run_flow(flow_fn, scenario=scenario), as_json, "Bootstrap")


@app.command()
def adopt(train: Annotated[Path, typer.Option("--train", help="Labelled CSV/Parquet/JSON(L): the replay pool, and "
                                              "the training data when no --model is given.")],
          golden: Annotated[Optional[Path], typer.Option("--golden", help="Golden set (same columns); default: a "
                                                         "stratified 15% of --train, held out.")] = None,
          model: Annotated[Optional[Path], typer.Option("--model", help="A transformers sequence-classification "
                                                        "checkpoint directory, registered as v1 as it is.")] = None,
          model_name: Annotated[Optional[str], typer.Option("--model-name", help="Registered model name "
                                                            "(default REFIT_MODEL_NAME).")] = None,
          text_column: Annotated[str, typer.Option("--text-column", help="Column holding the text.")] = "text",
          label_column: Annotated[str, typer.Option("--label-column", help="Column holding the label.")] = "label",
          store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Make champion v1 from a team's own model, data and golden set, with no scenario.

    Example: refit adopt --model ./my-classifier --train train.csv --golden golden.csv --model-name support-intents --json
    """
    if model_name:
        os.environ["REFIT_MODEL_NAME"] = model_name
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from tasks.adopt import prepare_adoption

    # Checked before anything is written (not even REFIT_HOME or Prefect's database); the flow checks again.
    prepare_adoption(train, golden, model, text_column, label_column)
    _prepare(store)
    from flows.adopt import adopt as flow_fn

    _emit(_run_flow(flow_fn, train_path=str(train), golden_path=str(golden) if golden else None,
                    model_path=str(model) if model else None, text_column=text_column, label_column=label_column),
          as_json, "Adopt")


@app.command()
def monitor(store: StoreOption = None,
            window_end: Annotated[Optional[str], typer.Option(help="ISO time the window ends (default now).")] = None,
            window_hours: Annotated[Optional[float], typer.Option(help="Window length (default: since the last check).")] = None,
            policy: Annotated[Optional[str], typer.Option(help="Drift policy name or YAML path (default: "
                                                           "REFIT_DRIFT_POLICY, else drift).")] = None,
            then_update: Annotated[bool, typer.Option(
                "--update", help="Without a Prefect server (cron, embedded): when the check's action is update, "
                                 "run that update in this command. On a server the drift event starts it.")] = False,
            model_name: ModelNameOption = None, as_json: JsonOption = False) -> None:
    """Check the newest traffic window for drift.

    Example: refit monitor --window-hours 24 --json
    Example (cron, no Prefect server): refit monitor --update --json
    """
    _prepare(store, model_name)
    if policy and Path(policy).suffix in (".yaml", ".yml"):
        os.environ["REFIT_DRIFT_POLICY"] = str(Path(policy).resolve())  # this caller's own file: pinned for its run
    from flows.common import on_prefect_server
    from flows.monitor import monitor as flow_fn

    result = _run_flow(flow_fn, window_end=window_end, window_hours=window_hours, policy=policy)
    if then_update and result.get("action") == "update":
        if on_prefect_server():
            result["update"] = "started by the drift event on the Prefect server (--update runs it only without one)"
        else:
            from flows.update import update as update_fn

            result["update"] = _run_flow(update_fn, episode_id=result["episode"], drift_run_id=result["drift_run_id"])
    _emit(result, as_json, "Drift check")


@app.command()
def update(labels: Annotated[Optional[str], typer.Option(
               help="Labelled CSV/Parquet/JSON (text, label), a path or file:// / s3:// URI: the hotfix path.")] = None,
           window_start: Annotated[Optional[str], typer.Option(help="Start of the labelled traffic window (ISO).")] = None,
           window_end: Annotated[Optional[str], typer.Option(help="End of the labelled traffic window (ISO).")] = None,
           gate: Annotated[Optional[str], typer.Option(help="Gate policy name, or a YAML path (pinned for this "
                                                            "command as REFIT_GATE_POLICY).")] = None,
           reason: Annotated[Optional[str], typer.Option(help="Why (a ticket); recorded on the run and version.")] = None,
           episode: Annotated[Optional[str], typer.Option(help="Drift episode to learn from (default: the "
                                                               "model's open one, when no window or file is given).")] = None,
           force: Annotated[bool, typer.Option(help="Train even if these labels already paid for a "
                                                     "fine-tune.")] = False,
           model_name: ModelNameOption = None, store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Fine-tune, gate and (on a pass) promote an update.

    With no file and no window it learns from the open drift episode's labels, or says it waits for labels.

    Example (hotfix): refit update --labels s3://bucket/fixes.csv --reason "T-42: travel intents wrong"
    """
    if gate and (Path(gate).suffix in (".yaml", ".yml") or "/" in gate):
        os.environ["REFIT_GATE_POLICY"] = str(Path(gate).resolve())  # the operator pins a file; runs name policies
        gate = None
    settings = _prepare(store, model_name)
    if labels:  # refused at once where REFIT_LABEL_SOURCES rules it out; the flow checks again (a server's inbox too)
        from refit.labels import check_source

        check_source(labels, settings.allowed_label_sources())
    from flows.update import update as flow_fn

    result = _run_flow(flow_fn, labels_path=labels, window_start=window_start,
                       window_end=window_end, gate_policy=gate, reason=reason, force=force,
                       episode_id=episode)
    _emit(result, as_json, "Update")


@app.command()
def rollback(reason: Annotated[str, typer.Option(help="Why; recorded on the demoted version.")] = "manual rollback",
             model_name: ModelNameOption = None, store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Move the champion back to the previous version.

    Example: refit rollback --reason "complaints from support"
    """
    _prepare(store, model_name)
    from flows.rollback import rollback as flow_fn

    _emit(_run_flow(flow_fn, reason=reason), as_json, "Rollback")


@app.command()
def ui(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000) -> None:
    """Open the MLflow UI on the embedded store (Ctrl-C stops it).

    Example: refit ui --port 5000
    """
    settings = _prepare()
    # The store's URI (a password, for a database) goes through the environment, never a command line.
    os.environ["MLFLOW_BACKEND_STORE_URI"] = settings.tracking_uri
    os.execvp("mlflow", ["mlflow", "ui", "--host", "127.0.0.1", "--port", str(port)])



@app.command()
def report(model_name: ModelNameOption = None, as_json: JsonOption = False) -> None:
    """Cost on one page per model: champion, versions, updates and spend this month against the budget, CPU per
    1,000 alone and as a cascade, the student's share, the estimated monthly serving cost. Logged to MLflow
    (a report run: report.html, report.md, report.json).

    Example: refit report --model-name intent-classifier --json
    """
    settings = _prepare(model_name=model_name)
    from tasks.report import cost_report
    from refit.store import open_store
    from registry.tracking import configure

    reports = cost_report([settings.model_name] if model_name else None, configure(settings), open_store(settings),
                          settings.cpu_usd_per_hour, settings.monthly_budget_usd)
    if as_json:
        print(json.dumps(reports, default=str))
        return
    for page in reports:
        _emit(page, False, f"Cost report: {page['model_name']}")
