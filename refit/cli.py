"""The ``refit`` command: the composition root.

It starts flows and servers, so it reaches up into ``flows/``, but only inside
each command: importing this module loads neither Prefect, torch nor MLflow.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from refit.errors import RefitError
from refit.settings import OFFLINE_ENV, Settings

app = typer.Typer(help="Keep a deployed language model fresh, automatically and cheaply.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)

StoreOption = Annotated[Optional[str], typer.Option("--store", help="Object store: local (default) or s3.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line of stdout.")]


def _prepare(store: str | None = None) -> Settings:
    """Settings from the environment, with the process set up to use them offline."""
    if store:
        if store not in ("local", "s3"):
            raise RefitError(f"--store must be local or s3, not {store!r}")
        os.environ["REFIT_STORE"] = store
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's ValidationError, reported in one line
        raise RefitError(f"invalid settings: {str(exc).splitlines()[0]} {str(exc).splitlines()[-1].strip()}") from exc
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    # Prefect's local API keeps its database under REFIT_HOME, so runs can be reviewed later.
    os.environ.setdefault("PREFECT_HOME", str(settings.home_dir / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    settings.apply_environment()
    return settings


def _run_flow(flow_fn, **params) -> dict:
    """Run a flow in-process; a Failed state becomes a one-line RefitError."""
    state = flow_fn(return_state=True, **params)
    if state.is_failed():
        raise RefitError(state.message or f"{flow_fn.name} failed")
    return state.result()


def _emit(result: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table(title=title, show_header=False)
    for key, value in result.items():
        table.add_row(key, json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


@app.command()
def demo(store: StoreOption = None, scenario: Annotated[Optional[str], typer.Option(help="Scenario name or YAML path.")] = None,
         as_json: JsonOption = False) -> None:
    """Run the whole loop on the default scenario: bootstrap, no-drift, shift, update, poisoned hotfix.

    Example: refit demo --json
    """
    settings = _prepare(store)
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
        Console().print(f"Review it: mlflow ui --backend-store-uri {settings.tracking_uri} --port 5000")


@app.command()
def bootstrap(store: StoreOption = None, scenario: Annotated[Optional[str], typer.Option(help="Scenario name or YAML path.")] = None,
              as_json: JsonOption = False) -> None:
    """Train champion v1 from the scenario and register it.

    Example: refit bootstrap --scenario clinc-shift
    """
    _prepare(store)
    from flows.bootstrap import bootstrap as flow_fn

    _emit(_run_flow(flow_fn, scenario=scenario), as_json, "Bootstrap")


@app.command()
def monitor(store: StoreOption = None,
            window_end: Annotated[Optional[str], typer.Option(help="ISO time the window ends (default now).")] = None,
            window_hours: Annotated[Optional[float], typer.Option(help="Window length (default: since the last check).")] = None,
            policy: Annotated[str, typer.Option(help="Drift policy name or YAML path.")] = "drift",
            as_json: JsonOption = False) -> None:
    """Check the newest traffic window for drift.

    Example: refit monitor --window-hours 24 --json
    """
    _prepare(store)
    from flows.monitor import monitor as flow_fn

    _emit(_run_flow(flow_fn, window_end=window_end, window_hours=window_hours, policy=policy), as_json, "Drift check")


@app.command()
def update(labels: Annotated[Optional[Path], typer.Option(help="Labelled CSV/Parquet/JSON (text, label): the hotfix path.")] = None,
           window_start: Annotated[Optional[str], typer.Option(help="Start of the labelled traffic window (ISO).")] = None,
           window_end: Annotated[Optional[str], typer.Option(help="End of the labelled traffic window (ISO).")] = None,
           gate: Annotated[str, typer.Option(help="Gate policy name or YAML path.")] = "gate",
           store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Fine-tune, gate and (on a pass) promote an update.

    Example (hotfix): refit update --labels fixes.csv
    """
    _prepare(store)
    from flows.update import update as flow_fn

    result = _run_flow(flow_fn, labels_path=str(labels) if labels else None, window_start=window_start,
                       window_end=window_end, gate_policy=gate)
    _emit(result, as_json, "Update")


@app.command()
def rollback(reason: Annotated[str, typer.Option(help="Why; recorded on the demoted version.")] = "manual rollback",
             store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Move the champion back to the previous version.

    Example: refit rollback --reason "complaints from support"
    """
    _prepare(store)
    from flows.rollback import rollback as flow_fn

    _emit(_run_flow(flow_fn, reason=reason), as_json, "Rollback")


@app.command()
def ui(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000) -> None:
    """Open the MLflow UI on the embedded store (Ctrl-C stops it).

    Example: refit ui --port 5000
    """
    settings = _prepare()
    os.execvp("mlflow", ["mlflow", "ui", "--backend-store-uri", settings.tracking_uri,
                         "--host", "127.0.0.1", "--port", str(port)])


def main() -> None:
    try:
        app()
    except RefitError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
