"""What every ``refit`` command shares: the Typer apps, the common options, settings for a command, and output.

Importing it loads neither Prefect, torch nor MLflow: each command imports what it runs inside its body.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from refit import orphans
from refit.errors import RefitError
from refit.settings import OFFLINE_ENV, Settings, settings_error

app = typer.Typer(help="Keep a deployed language model fresh, automatically and cheaply.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)

StoreOption = Annotated[Optional[str], typer.Option("--store", help="Object store: local (default) or s3.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line of stdout.")]
ModelNameOption = Annotated[Optional[str], typer.Option(
    "--model-name", help="Registered model name (default REFIT_MODEL_NAME): one install serves several models.")]


def _prepare(store: str | None = None, model_name: str | None = None) -> Settings:
    """Settings from the environment, with the process set up to use them offline."""
    if model_name:
        os.environ["REFIT_MODEL_NAME"] = model_name
    if store:
        if store not in ("local", "s3"):
            raise RefitError(f"--store must be local or s3, not {store!r}")
        os.environ["REFIT_STORE"] = store
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's ValidationError, reported in one line
        raise RefitError(f"invalid settings: {settings_error(exc)}") from exc
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    # Prefect's local API keeps its database under REFIT_HOME, so runs can be reviewed later.
    os.environ.setdefault("PREFECT_HOME", str(settings.home_dir / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # Prefect's temporary API gives up after 20 s by default: too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    settings.apply_environment()
    return settings


def _run_flow(flow_fn, **params) -> dict:
    """Run a flow in-process; a Failed state becomes a one-line RefitError."""
    orphans.watch()  # if this command is killed, its temporary Prefect API is stopped too
    state = flow_fn(return_state=True, **params)
    if state.is_failed():
        raise RefitError(state.message or f"{flow_fn.name} failed")
    return state.result()


def _report(result: dict, tables, as_json: bool) -> None:
    """A benchmark's tables (on stderr with ``--json``, so stdout stays one JSON object) and its JSON line."""
    out = err if as_json else Console()
    for table in tables:
        out.print(table)
    if as_json:
        print(json.dumps(result, default=str))


def _emit(result: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table(title=escape(title), show_header=False)  # names and paths are the user's: never rich markup
    for key, value in result.items():
        table.add_row(key, escape(json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)))
    Console().print(table)



bench_app = typer.Typer(help="Benchmarks that print the numbers the README quotes.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
labels_app = typer.Typer(help="Labels in: delayed ground truth from your labelling process.", no_args_is_help=True)
app.add_typer(labels_app, name="labels")
