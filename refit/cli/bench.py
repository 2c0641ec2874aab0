"""``refit bench ...``: the benchmarks behind docs/benchmarks.md."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from refit.errors import RefitError
from refit.settings import OFFLINE_ENV, Settings
from refit.cli.common import JsonOption, _prepare, _report, _run_flow, bench_app, err



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
                    help="Shift families, comma-separated: within (new intents in known domains), between, "
                         "domains (new intents of a few domains, text alone).")]
                = "within,between,domains",
                gradual: Annotated[str, typer.Option(
                    help="Extra shares of new intents measured on the within family, comma-separated percents "
                         "('' skips).")] = "5,10,20",
                scale: Annotated[str, typer.Option(
                    help="Window sizes to time, comma-separated ('' skips).")] = "10000,100000",
                baseline_pairs: Annotated[int, typer.Option(
                    min=0, help="Pairs per row also checked by Evidently's default text drift (~2-4 s each).")] = 10,
                shift_share: Annotated[float, typer.Option(
                    min=0.01, max=1.0, help="Share of a shifted window from the shift's intents.")] = 0.3,
                policy: Annotated[str, typer.Option(help="Drift policy name or YAML path.")] = "drift") -> None:
    """False alarms and detections of the drift check on real CLINC150 windows scored by a real champion.

    Thresholds are the policy's: calibrated from each pair's reference, never from these windows.

    Example: refit bench drift --pairs 40 --sizes 500 --scale "" --json
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from refit.bench.drift import CHAMPION_FAMILIES, FAMILIES, run_benchmark, tables

    size_list, scale_list = _int_list(sizes, "--sizes"), _int_list(scale, "--scale")
    family_list = tuple(f.strip() for f in families.split(",") if f.strip())
    if not family_list or any(f not in FAMILIES for f in family_list):
        raise RefitError(f"--families takes {', '.join(FAMILIES)}, comma-separated, not {families!r}")
    try:
        shares = tuple(float(p) / 100 for p in gradual.split(",") if p.strip())
    except ValueError:
        raise RefitError(f"--gradual takes comma-separated percents, not {gradual!r}") from None
    if any(not 0 < share <= 1 for share in shares):
        raise RefitError(f"--gradual percents must be above 0 and at most 100, got {gradual!r}")
    data_dir = Settings().data_dir
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # quiet and second-quiet windows, then one shifted window per share; in each mode the family is checked in
    rows = sum((2 + (len(set(shares) | {shift_share}) if f == "within" else 1))
               * (2 if f in CHAMPION_FAMILIES else 1) for f in family_list)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        job = bar.add_task("drift benchmark", total=pairs * rows * len(size_list) + len(scale_list))
        result = run_benchmark(data_dir, pairs, size_list, scale_list, baseline_pairs, shift_share, policy,
                               family_list, shares, progress=lambda what, n: bar.update(job, advance=n,
                                                                                        description=what))
    _report(result, tables(result), as_json)


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
    _report(result, tables(result), as_json)


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
    _report(result, [table(result)], as_json)


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
    _report(result, [table(result)], as_json)

