"""demo: the whole loop on a scenario, start to finish, shift after shift.

bootstrap → a no-drift window (monitor: nothing to do) → for each shift of
the scenario, a window of its traffic (monitor: drift, update, promotion) →
a hand-run hotfix with poisoned labels (the gate refuses it and the champion
stays). On a Prefect server the update starts from the drift event; here the
demo starts it when the monitor says so.

The scenario also scores champion and challenger on each shift's test texts
(``external`` accuracy) for the report; nothing it knows feeds a decision.
A second run in the same home starts the story again: the demo's model's
simulated traffic, labels, references and golden suite are deleted first;
MLflow keeps every earlier run and version.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from prefect import flow
from prefect.logging import get_run_logger
from prefect.states import State

from flows.bootstrap import bootstrap
from flows.common import open_context, settings_for, user_error
from flows.monitor import monitor
from flows.update import update
from refit import modeling
from refit.demo_report import ShiftOutcome, summarize
from refit.errors import RefitError
from refit.evalsets import read_golden
from tasks.report import cascade_figures
from refit.requestlog import delete_model_data
from refit.secrets import mask_uri
from refit.scenario import build, load_scenario, load_source, poison
from registry import versions
from tasks.evaluate import accuracy_on
from tasks.ingest import replay_traffic

WINDOW = timedelta(minutes=10)


class Stages:
    """Per-stage wall times, logged as each stage ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._logger = get_run_logger()

    def run(self, stage: str, fn, *args, **kwargs):
        self._logger.info("stage %s: started", stage)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[stage] = round(time.perf_counter() - start, 2)
        self._logger.info("stage %s: done in %.1f s", stage, self.seconds[stage])
        return out


def _subflow(stages: Stages, stage: str, flow_fn, **params) -> dict:
    state: State = stages.run(stage, flow_fn, return_state=True, **params)
    if state.is_failed():
        raise RefitError(f"{stage} failed: {state.message}")
    return state.result()


@flow(name="demo")
def demo(scenario: str | None = None, model_name: str | None = None) -> dict:
    """Run the loop and return the summary the CLI prints with ``--json``."""
    try:
        settings = settings_for(model_name)
        spec, _ = load_scenario(scenario or settings.scenario)
        data = build(spec, load_source(spec.source, settings.data_dir))
        ctx = open_context(settings)
    except RefitError as exc:
        return user_error(exc)
    stages = Stages()
    name = ctx.model_name
    externals = {shift.name: shift.external for shift in data.shifts}
    try:
        stages.run("forget-earlier-demo", delete_model_data, ctx.store, name)
        boot = _subflow(stages, "bootstrap", bootstrap, scenario=scenario, model_name=name)
        v1 = boot["version"]
        golden_v1 = read_golden(ctx.store, name).frame
        now = datetime.now(timezone.utc).replace(microsecond=0)
        start = now - WINDOW * (len(data.shifts) + 1)
        stages.run("replay-no-drift", replay_traffic, ctx.store, name, *_served_by(name, v1), v1,
                   data.no_drift_window, start, start + WINDOW, seed=spec.seed)
        quiet = _subflow(stages, "monitor-no-drift", monitor, window_end=(start + WINDOW).isoformat(),
                         window_hours=WINDOW.total_seconds() / 3600, model_name=name)

        outcomes: list[ShiftOutcome] = []
        for k, shift in enumerate(data.shifts, start=1):
            begin, end = start + WINDOW * k, start + WINDOW * (k + 1)
            champion = versions.alias_version(name, versions.CHAMPION)
            stages.run(f"replay-{shift.name}", replay_traffic, ctx.store, name, *_served_by(name, champion),
                       champion, shift.window, begin, end, labelled_share=shift.labelled_share, seed=spec.seed + k)
            drifted = _subflow(stages, f"monitor-{shift.name}", monitor, window_end=end.isoformat(),
                               window_hours=WINDOW.total_seconds() / 3600, model_name=name)
            updated = None
            if drifted["action"] == "update":
                updated = _subflow(stages, f"update-{shift.name}", update, window_start=begin.isoformat(),
                                   window_end=end.isoformat(), drift_run_id=drifted["drift_run_id"], model_name=name)
            outcomes.append(stages.run(f"score-{shift.name}", _outcome, name, shift.name, shift.external, champion,
                                       drifted, updated))

        final = versions.alias_version(name, versions.CHAMPION)
        hotfix_file = ctx.settings.home_dir / "demo" / f"hotfix-poisoned-{name}.csv"
        hotfix_file.parent.mkdir(parents=True, exist_ok=True)
        final_labels = modeling.read_labels(versions.download_adapter(name, final))
        poison(data.hotfix, final_labels, spec.seed)[["text", "label"]].to_csv(hotfix_file, index=False)
        # force: the poisoned file is the same on every run, and an earlier run's refusal must not answer for this one
        hotfix = _subflow(stages, "hotfix-poisoned", update, labels_path=str(hotfix_file), force=True,
                          model_name=name)

        champion_after = versions.alias_version(name, versions.CHAMPION)
        ends = stages.run("score-final", _final_scores, name, v1, champion_after, golden_v1, externals)
    except RefitError as exc:
        return user_error(exc)

    summary = summarize(v1=v1, champion_after=champion_after, quiet=quiet, shifts=outcomes, hotfix=hotfix,
                        golden_before=ends["golden_before"], golden_after=ends["golden_after"],
                        external_final=ends["external_final"], tracking_uri=mask_uri(ctx.settings.tracking_uri),
                        store_uri=ctx.store.uri(), stage_seconds=stages.seconds)
    summary |= cascade_figures(name, champion_after)  # the final champion's cheap tier, as its gate measured it
    get_run_logger().info("demo summary: %s", summary)
    return summary


def _served_by(name: str, version: int) -> tuple:
    """What ``refit serve`` answers with for the version (its gated cascade, else the model alone; no tokenizer
    needed), to score simulated traffic as serving would."""
    from registry.served import load_cascade, load_version

    champion = load_version(name, version, tokenizer=modeling.load_tokenizer(versions.download_adapter(name, version)))
    return load_cascade(name, version, champion) or champion, None


def _outcome(name: str, shift: str, external, champion: int, drifted: dict, updated: dict | None) -> ShiftOutcome:
    """What one shift did, with champion and challenger scored on the shift's test texts for the report."""
    before = accuracy_on(versions.download_adapter(name, champion), {shift: external})[shift]
    challenger = updated.get("version") if updated else None
    after = (accuracy_on(versions.download_adapter(name, challenger), {shift: external})[shift]
             if challenger is not None else before)
    return ShiftOutcome(shift, drifted, updated, before, after)


def _final_scores(name: str, v1: int, final: int, golden_v1, externals: dict) -> dict:
    first = accuracy_on(versions.download_adapter(name, v1), {"golden": golden_v1})
    last = accuracy_on(versions.download_adapter(name, final), {"golden": golden_v1, **externals})
    return {"golden_before": first["golden"], "golden_after": last.pop("golden"), "external_final": last}
