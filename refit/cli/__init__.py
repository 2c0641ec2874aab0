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


def _emit(result: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table(title=escape(title), show_header=False)  # names and paths are the user's: never rich markup
    for key, value in result.items():
        table.add_row(key, escape(json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)))
    Console().print(table)


@app.command()
def demo(store: StoreOption = None, scenario: Annotated[Optional[str], typer.Option(help="Scenario name or YAML path.")] = None,
         model_name: ModelNameOption = None, as_json: JsonOption = False) -> None:
    """Run the whole loop on the default scenario: bootstrap, no-drift, shift, update, poisoned hotfix.

    Example: refit demo --json
    """
    settings = _prepare(store, model_name)
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
    _prepare(store, model_name)
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

            result["update"] = _run_flow(update_fn, window_start=result["window_start"],
                                         window_end=result["window_end"], drift_run_id=result["drift_run_id"])
    _emit(result, as_json, "Drift check")


@app.command()
def update(labels: Annotated[Optional[str], typer.Option(
               help="Labelled CSV/Parquet/JSON (text, label), a path or file:// / s3:// URI: the hotfix path.")] = None,
           window_start: Annotated[Optional[str], typer.Option(help="Start of the labelled traffic window (ISO).")] = None,
           window_end: Annotated[Optional[str], typer.Option(help="End of the labelled traffic window (ISO).")] = None,
           gate: Annotated[Optional[str], typer.Option(help="Gate policy name, or a YAML path (pinned for this "
                                                            "command as REFIT_GATE_POLICY).")] = None,
           reason: Annotated[Optional[str], typer.Option(help="Why (a ticket); recorded on the run and version.")] = None,
           force: Annotated[bool, typer.Option(help="Train even if this window or file already paid for a "
                                                     "fine-tune.")] = False,
           model_name: ModelNameOption = None, store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Fine-tune, gate and (on a pass) promote an update.

    Example (hotfix): refit update --labels s3://bucket/fixes.csv --reason "T-42: travel intents wrong"
    """
    if gate and (Path(gate).suffix in (".yaml", ".yml") or "/" in gate):
        os.environ["REFIT_GATE_POLICY"] = str(Path(gate).resolve())  # the operator pins a file; runs name policies
        gate = None
    _prepare(store, model_name)
    from flows.update import update as flow_fn

    result = _run_flow(flow_fn, labels_path=labels, window_start=window_start,
                       window_end=window_end, gate_policy=gate, reason=reason, force=force)
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


def _drift_files(reference_path: Path, current_path: Path, policy_name: str, text_column: str,
                 optional_columns: dict[str, tuple[str, bool]], embeddings_cache: bool = True) -> dict:
    """Read, validate and measure two files; the verdict as a JSON-ready dict.

    ``optional_columns`` maps refit's name (``predicted_label``, ``confidence``,
    ``label``) to the file's name and whether the user named it: a named
    column must be in both files, a default one is used when both have it.
    With ``embeddings_cache`` the reference's embeddings are read from beside
    it, and written there when missing, stale or short of what this check
    embedded: the reference is the same check after check, the window is not.
    """
    from refit.data import read_table

    paths = {"reference": reference_path, "current": current_path}
    frames = {side: read_table(path) for side, path in paths.items()}
    for side, frame in frames.items():
        path = paths[side]
        if frame.empty:
            raise RefitError(f"{side} file {path} has no rows")
        if text_column not in frame.columns:
            raise RefitError(f"{side} file {path} has no column {text_column!r} "
                             f"(columns: {', '.join(map(str, frame.columns))}); name it with --text-column")
    rename = {text_column: "text"}
    skipped = {}
    for ours, (theirs, named) in optional_columns.items():
        lacking = [side for side, frame in frames.items() if theirs not in frame.columns]
        if theirs in rename:
            if named:
                raise RefitError(f"column {theirs!r} is already read as {rename[theirs]!r}: "
                                 "each column option must name a different column")
            skipped[ours] = f"column {theirs!r} is read as {rename[theirs]!r}"
        elif not lacking:
            rename[theirs] = ours
        elif named:
            side = lacking[0]
            raise RefitError(f"{side} file {paths[side]} has no column "
                             f"{theirs!r} (columns: {', '.join(map(str, frames[side].columns))})")
        else:
            skipped[ours] = f"no column {theirs!r} in the {' and '.join(lacking)} file"
    signal_of = {"predicted_label": "prediction", "confidence": "confidence"}
    skipped = {signal_of[ours]: why for ours, why in skipped.items() if ours in signal_of}
    # Request ids and timestamps are not measured, but they are validated (duplicates, bad times) where present;
    # a reference's scored_on column says whether its confidences are on rows the champion never trained on.
    checked_only = [c for c in ("request_id", "timestamp", "scored_on")
                    if c not in rename and c not in rename.values()]
    reference, current = (
        frames[side][list(rename) + [c for c in checked_only if c in frames[side].columns]].rename(columns=rename)
        for side in ("reference", "current"))

    # Only what a check needs: tasks.drift and tasks.validate build their Prefect tasks on first use, and
    # Evidently is imported only for its HTML report, which this command does not write.
    from tasks.drift import load_drift_policy, measure_drift
    from tasks.validate import split_bad_inference_rows

    policy, policy_path = load_drift_policy(policy_name)

    reference_kept, reference_bad = split_bad_inference_rows(reference, required=["text"])
    if len(reference_kept) < 2:
        raise RefitError(f"reference file {reference_path} has {len(reference_kept)} usable rows of {len(reference)} "
                         f"({_reasons(reference_bad)}): it needs at least 2")
    kept, bad = split_bad_inference_rows(current, required=["text"])
    if len(kept) < policy.min_window_rows:
        raise RefitError(f"window rejected: {len(kept)} usable rows of {len(current)} in {current_path}, "
                         f"policy needs at least {policy.min_window_rows}"
                         + (f" ({len(bad)} quarantined: {_reasons(bad)})" if len(bad) else ""))
    sidecar = _read_reference_embeddings(reference_path, reference_kept["text"]) if embeddings_cache else None
    result = measure_drift(reference_kept, kept, policy, report=False)
    if sidecar is not None:
        _write_reference_embeddings(reference_kept["text"], *sidecar)
    verdict = result.to_dict() | {
        "rows_checked": len(current),
        "rows_kept": len(kept),
        "rows_quarantined": len(bad),
        "quarantine_reasons": _reasons(bad),
        "reference_rows_dropped": len(reference_bad),
        "reference_drop_reasons": _reasons(reference_bad),
        "signals_skipped": skipped | {name: "disabled in the policy" for name in ("text", "prediction", "confidence")
                                      if not getattr(policy, name).enabled},
        "reference": str(reference_path),
        "current": str(current_path),
        "policy": str(policy_path),
    }
    if "label" in rename.values():
        verdict["labels"] = _label_summary(reference_kept, kept)
    return verdict


def _read_reference_embeddings(reference_path: Path, texts) -> tuple[Path, bytes | None]:
    """The reference's sidecar and its bytes, with its vectors made known to the encoder when they fit."""
    from tasks.drift import embeddings_sidecar, reuse_reference_embeddings

    path = embeddings_sidecar(reference_path)
    payload = path.read_bytes() if path.is_file() else None
    status = reuse_reference_embeddings(payload, texts)
    if status != "read" and payload is not None:
        err.print(f"reference embeddings in {path} are {status}: computing them again", markup=False, highlight=False)
    return path, payload if status == "read" else None


def _write_reference_embeddings(texts, path: Path, payload: bytes | None) -> None:
    """Keep what this check embedded of the reference beside it, for the next check (written whole, then moved)."""
    from tasks.drift import reference_embeddings_payload

    fresh = reference_embeddings_payload(texts, payload)
    if fresh is None:
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(fresh)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        err.print(f"reference embeddings not kept ({exc}): the next check embeds the reference again",
                  markup=False, highlight=False)


def _reasons(bad) -> dict[str, int]:
    return {str(k): int(v) for k, v in bad["reason"].value_counts().items()} if len(bad) else {}


def _label_summary(reference, current) -> dict:
    """Labelled rows on each side and, with predictions, their accuracy: reported, never part of the verdict."""
    summary = {}
    for side, frame in (("reference", reference), ("current", current)):
        labelled = frame[frame["label"].notna() & (frame["label"].astype(str).str.strip() != "")]
        summary[f"{side}_labelled_rows"] = len(labelled)
        if "predicted_label" in frame.columns and len(labelled):
            hits = labelled["predicted_label"].astype(str) == labelled["label"].astype(str)
            summary[f"{side}_accuracy"] = round(float(hits.mean()), 4)
    return summary


def _signal_table(verdict: dict, title: str) -> Table:
    table = Table(title=title, caption=(
        f"{verdict['rows_checked']} rows checked, {verdict['rows_quarantined']} quarantined, "
        f"{verdict['rows_kept']} measured against {verdict['rows_reference']} reference rows "
        f"(sampling: {verdict['sample_method']})"))
    for column, justify in (("signal", "left"), ("method", "left"), ("value", "right"), ("threshold", "right"),
                            ("drifted", "left")):
        table.add_column(column, justify=justify)
    for name, signal in verdict["signals"].items():
        table.add_row(name, signal["method"], f"{signal['value']:.4f}",
                      f"{'>' if signal['direction'] == 'above' else '<'} {signal['threshold']}",
                      "[bold red]yes[/]" if signal["drifted"] else "no")
    for name, why in verdict["signals_skipped"].items():
        table.add_row(name, "-", "-", "-", f"skipped: {why}")
    return table


@app.command()
def drift(reference: Annotated[Path, typer.Argument(help="Reference table: .parquet, .csv or .jsonl.")],
          current: Annotated[Path, typer.Argument(help="Window to check, same formats.")],
          as_json: JsonOption = False,
          text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
          prediction_column: Annotated[Optional[str], typer.Option(
              help="Predicted-label column (default: predicted_label, used when both files have it).")] = None,
          confidence_column: Annotated[Optional[str], typer.Option(
              help="Confidence column (default: confidence, used when both files have it).")] = None,
          label_column: Annotated[Optional[str], typer.Option(
              help="True-label column, reported only (default: label, used when both files have it).")] = None,
          policy: Annotated[str, typer.Option(help="Drift policy name or YAML path.")] = "drift",
          embeddings_cache: Annotated[bool, typer.Option(
              help="Keep the reference's embeddings beside it (REFERENCE.embeddings.npz) and reuse them while "
                   "the reference's texts and the encoder are unchanged.")] = True) -> None:
    """Check a window against a reference, with no server: validate it, measure the drift signals, print the verdict.

    The first check of a reference embeds it and keeps the vectors beside it;
    later checks embed only the window. The encoder runs on ONNX Runtime,
    exported once (with torch) to REFIT_HOME/cache/encoders.

    Example: refit drift reference.parquet window.csv --text-column utterance --json
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    optional = {ours: (given or ours, given is not None) for ours, given in
                (("predicted_label", prediction_column), ("confidence", confidence_column), ("label", label_column))}
    verdict = _drift_files(reference, current, policy, text_column, optional, embeddings_cache)
    heading = (f"Drift check: {'DRIFT' if verdict['drift_detected'] else 'no drift'} "
               f"(severity {verdict['severity']})")
    (err if as_json else Console()).print(_signal_table(verdict, heading))
    if as_json:
        print(json.dumps(verdict, default=str))


bench_app = typer.Typer(help="Benchmarks that print the numbers the README quotes.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _int_list(value: str, option: str) -> list[int]:
    """``"200,500,2000"`` → ``[200, 500, 2000]``; an empty value or ``none`` is an empty list."""
    if value.strip().lower() in ("", "none"):
        return []
    try:
        numbers = [int(part.replace("_", "")) for part in value.split(",") if part.strip()]
    except ValueError:
        raise RefitError(f"{option} takes comma-separated whole numbers, not {value!r}") from None
    if any(n < 2 for n in numbers):
        raise RefitError(f"{option} sizes must be at least 2, got {value!r}")
    return numbers


@bench_app.command("drift")
def bench_drift(as_json: JsonOption = False,
                pairs: Annotated[int, typer.Option(min=1, help="Quiet and shifted window pairs per row.")] = 40,
                sizes: Annotated[str, typer.Option(help="Window sizes, comma-separated ('' skips).")] = "500",
                families: Annotated[str, typer.Option(
                    help="Shift families, comma-separated: within (new intents in known domains), between.")]
                = "within,between",
                gradual: Annotated[str, typer.Option(
                    help="Extra shares of new intents measured on the within family, comma-separated percents "
                         "('' skips).")] = "5,10,20",
                scale: Annotated[str, typer.Option(
                    help="Window sizes to time, comma-separated ('' skips).")] = "10000,100000",
                baseline_pairs: Annotated[int, typer.Option(
                    min=0, help="Pairs per row also checked by Evidently's default text drift (~2-4 s each).")] = 10,
                shift_share: Annotated[float, typer.Option(
                    min=0.01, max=1.0, help="Share of a shifted window from the shift's intents.")] = 0.3,
                calibration_pairs: Annotated[int, typer.Option(
                    min=0, help="Quiet pairs per family, seeds apart from the measured ones, whose signal "
                                "quantiles are printed for the policy's thresholds (0 skips).")] = 0,
                calibration_rate: Annotated[float, typer.Option(
                    min=0.001, max=0.5, help="Target false-alarm rate of each signal's calibrated threshold.")]
                = 0.02,
                policy: Annotated[str, typer.Option(help="Drift policy name or YAML path.")] = "drift") -> None:
    """False alarms and detections of the drift check on real CLINC150 windows scored by a real champion.

    Example: refit bench drift --pairs 40 --sizes 500 --scale "" --json
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from refit.bench.drift import FAMILIES, run_benchmark, tables

    size_list, scale_list = _int_list(sizes, "--sizes"), _int_list(scale, "--scale")
    family_list = tuple(f.strip() for f in families.split(",") if f.strip())
    if not family_list or any(f not in FAMILIES for f in family_list):
        raise RefitError(f"--families takes {' and/or '.join(FAMILIES)}, comma-separated, not {families!r}")
    try:
        shares = tuple(float(p) / 100 for p in gradual.split(",") if p.strip())
    except ValueError:
        raise RefitError(f"--gradual takes comma-separated percents, not {gradual!r}") from None
    if any(not 0 < share <= 1 for share in shares):
        raise RefitError(f"--gradual percents must be above 0 and at most 100, got {gradual!r}")
    data_dir = Settings().data_dir
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rows = sum(1 + (len(set(shares) | {shift_share}) if f == "within" else 1) for f in family_list)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        job = bar.add_task("drift benchmark", total=2 * pairs * rows * len(size_list) + len(scale_list)
                           + calibration_pairs * len(family_list))
        result = run_benchmark(data_dir, pairs, size_list, scale_list, baseline_pairs, shift_share, policy,
                               family_list, shares, calibration_pairs, calibration_rate,
                               progress=lambda what, n: bar.update(job, advance=n, description=what))
    out = err if as_json else Console()
    for table in tables(result):
        out.print(table)
    if as_json:
        print(json.dumps(result, default=str))


@bench_app.command("update-cost")
def bench_update_cost(as_json: JsonOption = False,
                      scenario: Annotated[str, typer.Option(help="Scenario name or YAML path.")] = "clinc-shift",
                      update_policy: Annotated[str, typer.Option(help="Update policy name or YAML path.")] = "update",
                      gate_policy: Annotated[str, typer.Option(help="Gate policy name or YAML path.")] = "gate",
                      threads: Annotated[int, typer.Option(
                          min=0, help="Torch threads (0: torch's default). 1 keeps CPU-seconds honest on a busy "
                                      "machine, where waiting threads spin and bill CPU time.")] = 0) -> None:
    """The incremental update against a full retrain on all data so far, side by side (about 10 min on 2 cores).

    Example: refit bench update-cost --json
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    data_dir = Settings().data_dir
    if threads:
        import torch

        torch.set_num_threads(threads)
    from refit.bench.update import run_benchmark, tables

    with err.status("update-cost benchmark") as status:
        def progress(what: str) -> None:
            err.print(f"[dim]{what}[/]")
            status.update(what)

        result = run_benchmark(data_dir, scenario, update_policy, gate_policy, progress=progress)
    out = err if as_json else Console()
    for table in tables(result):
        out.print(table)
    if as_json:
        print(json.dumps(result, default=str))


@bench_app.command("cascade")
def bench_cascade(as_json: JsonOption = False,
                  scenario: Annotated[str, typer.Option(help="Scenario name or YAML path.")] = "clinc-shift",
                  home: Annotated[Optional[Path], typer.Option(
                      help="REFIT_HOME of the run (default: a new temporary directory, kept).")] = None,
                  http_seconds: Annotated[float, typer.Option(
                      min=0, help="Seconds per HTTP load round through refit serve, cascade and champion alone, each "
                                  "against transformers.pipeline (0 skips).")] = 10.0) -> None:
    """Champion alone against its cascade (student + champion), side by side on the same held-out texts.

    Bootstraps the scenario in its own REFIT_HOME (the flow builds and gates the cascade), then measures both as
    refit serve runs them, on one thread. Example: refit bench cascade --scenario clinc-shift-small --json
    """
    import tempfile

    os.environ["REFIT_HOME"] = str(home or tempfile.mkdtemp(prefix="refit-bench-cascade-"))
    os.environ.pop("PREFECT_HOME", None)  # the run's own Prefect database, under its REFIT_HOME
    _prepare()
    from flows.bootstrap import bootstrap as flow_fn
    from refit.bench.cascade import run_benchmark, summary, table

    with err.status("cascade benchmark") as status:
        def progress(what: str) -> None:
            err.print(f"[dim]{what}[/]")
            status.update(what)

        result = run_benchmark(scenario, progress, bootstrap=lambda name: _run_flow(flow_fn, scenario=name),
                               http_seconds=http_seconds)
    Console().print(table(result))
    if as_json:
        print(json.dumps(summary(result), default=str))


@bench_app.command("feedback")
def bench_feedback(as_json: JsonOption = False,
                   home: Annotated[Optional[Path], typer.Option(
                       help="REFIT_HOME of the run (default: a new temporary directory, kept); a home filled by an "
                            "earlier run is reused.")] = None,
                   requests: Annotated[int, typer.Option(min=1000, help="Logged requests to fill the store with.")]
                   = 1_000_000,
                   days: Annotated[int, typer.Option(min=1, max=33, help="Days they span, ending now.")] = 30,
                   calls: Annotated[int, typer.Option(min=2, help="/feedback calls, one at a time.")] = 200,
                   labels_per_call: Annotated[int, typer.Option(min=2, help="Labels per call.")] = 100,
                   unlogged_per_call: Annotated[int, typer.Option(
                       min=0, help="Labels per call for requests another replica still buffers.")] = 5) -> None:
    """/feedback over real HTTP against a month of request log: latency per call, and every label accounted for.

    Fills a local store with logged requests in the request log's layout, starts refit serve (no champion:
    /feedback needs none) and posts the calls. Example: refit bench feedback --home /tmp/fb --json
    """
    import tempfile

    from refit.bench.feedback import run_benchmark, table

    settings = _prepare()
    if unlogged_per_call >= labels_per_call:
        raise RefitError(f"--unlogged-per-call must be below --labels-per-call ({labels_per_call})")
    run_home = home or Path(tempfile.mkdtemp(prefix="refit-bench-feedback-"))

    def progress(what: str) -> None:
        err.print(f"[dim]{escape(what)}[/]", soft_wrap=True, highlight=False)

    result = run_benchmark(run_home, settings.data_dir, requests, days, calls, labels_per_call, unlogged_per_call,
                           progress=progress)
    (err if as_json else Console()).print(table(result))
    if as_json:
        print(json.dumps(result, default=str))


@bench_app.command("faults")
def bench_faults(as_json: JsonOption = False,
                 home: Annotated[Optional[Path], typer.Option(
                     help="REFIT_HOME of the run (default: a new temporary directory, kept).")] = None,
                 only: Annotated[Optional[str], typer.Option(
                     help="Run only these faults, comma-separated (names as in the result).")] = None) -> None:
    """The loop under injected faults: kills at each stage of an update and a rollback, an expired lock, two
    updates at once, MLflow and S3 stopped; after each, the operator's recovery and the invariants checked.

    Runs in its own REFIT_HOME with embedded defaults (about 30 min on 2 busy cores). Example:
    refit bench faults --only lock.expired_two_waiters,update.kill.after_train --json
    """
    import tempfile

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from refit.bench.faults import run_benchmark, table

    run_home = home or Path(tempfile.mkdtemp(prefix="refit-bench-faults-"))
    names = [name.strip() for name in only.split(",") if name.strip()] if only else None

    def progress(what: str) -> None:
        err.print(f"[dim]{escape(what)}[/]", soft_wrap=True, highlight=False)

    result = run_benchmark(run_home, names, progress)
    (err if as_json else Console()).print(table(result))
    if as_json:
        print(json.dumps(result, default=str))


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


labels_app = typer.Typer(help="Labels in: delayed ground truth from your labelling process.", no_args_is_help=True)
app.add_typer(labels_app, name="labels")


@labels_app.command("import")
def labels_import(file: Annotated[Path, typer.Argument(help="CSV/Parquet/JSON(L) with request_id,label (labels of "
                                                         "served requests) and/or text,label (never served).")],
                  model_name: ModelNameOption = None, store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Import labels: each row checked (request id in the request log, label not empty, no duplicate).

    Refused rows go to quarantine with the reason; accepted + quarantined = rows in the file. A label the
    model does not know is accepted: the next update's new-label policy decides on it.

    Example: refit labels import corrections.csv --model-name support-intents --json
    """
    settings = _prepare(store, model_name)
    from refit.data import read_table
    from refit.labels import check_source, import_labels
    from refit.store import open_store

    check_source(str(file), settings.allowed_label_sources())
    rows = read_table(file)
    if rows.empty:
        raise RefitError(f"{file} has no rows")
    result = import_labels(open_store(settings), settings.model_name, rows, source=f"import:{file.name}")
    _emit(result.to_dict() | {"model_name": settings.model_name}, as_json, f"Labels for {settings.model_name}")


# `refit stack up|down|status|env`: the local Prefect server, worker and MLflow server (refit/stack.py).
from refit.stack import app as stack_app  # noqa: E402  (typer only: no Prefect or MLflow import)

app.add_typer(stack_app, name="stack")


# The serving commands live with the server; refit.cli.serve imports only typer at module level.
from refit.cli.serve import bench_serve, serve  # noqa: E402

app.command("serve")(serve)
bench_app.command("serve")(bench_serve)


def main() -> None:
    try:
        app()
    except RefitError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
