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

import functools
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
from refit.cost import StageMeters, cpu_seconds_used
from refit.demo_report import ShiftOutcome, summarize
from refit.errors import RefitError
from refit.evalsets import read_golden
from tasks.report import cascade_figures
from refit.requestlog import delete_model_data
from refit.secrets import mask_uri
from refit import requestlog
from refit.scenario import Labellers, build, load_scenario, load_source, poison
from registry import versions
from tasks.evaluate import accuracy_on
from tasks.ingest import replay_traffic

WINDOW = timedelta(minutes=10)


class Stages:
    """Per-stage wall and CPU seconds (the process, its threads and children), logged as each stage ends.

    ``startup`` is what the process spent before the demo began: imports and the temporary Prefect API.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.meters = StageMeters()
        self.meters.cpu["startup"] = round(cpu_seconds_used(), 3)
        self._logger = get_run_logger()

    @property
    def cpu_seconds(self) -> dict[str, float]:
        return dict(self.meters.cpu)

    def run(self, stage: str, fn, *args, **kwargs):
        self._logger.info("stage %s: started", stage)
        start = time.perf_counter()
        with self.meters.stage(stage):
            out = fn(*args, **kwargs)
        self.seconds[stage] = round(time.perf_counter() - start, 2)
        self._logger.info("stage %s: done in %.1f s (%.1f CPU-s)", stage, self.seconds[stage],
                          self.meters.cpu[stage])
        return out


def _subflow(stages: Stages, stage: str, flow_fn, **params) -> dict:
    state: State = stages.run(stage, flow_fn, return_state=True, **params)
    if state.is_failed():
        raise RefitError(f"{stage} failed: {state.message}")
    return state.result()


@flow(name="demo")
def demo(scenario: str | None = None, model_name: str | None = None) -> dict:
    """Run the loop and return the summary the CLI prints with ``--json``."""
    began = time.perf_counter()
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
    labellers = Labellers()
    try:
        stages.run("forget-earlier-demo", forget_earlier_demo, ctx, name)
        boot = _subflow(stages, "bootstrap", bootstrap, scenario=scenario, model_name=name)
        v1 = boot["version"]
        golden_v1 = read_golden(ctx.store, name).frame
        now = datetime.now(timezone.utc).replace(microsecond=0)
        clock = Clock(now - WINDOW * (2 + sum(shift.windows for shift in data.shifts)))  # the last: quiet
        stages.run("replay-no-drift", replay_traffic, ctx.store, name, *_served_by(name, v1), v1,
                   data.no_drift_window, *clock.window(0), seed=spec.seed)
        quiet = _subflow(stages, "monitor-no-drift", monitor, window_end=clock.window(0)[1].isoformat(),
                         window_hours=WINDOW.total_seconds() / 3600, model_name=name)
        outcomes = [_shift(ctx, stages, shift, k, clock, labellers, spec.seed) for k, shift in
                    enumerate(data.shifts, start=1)]
        if stages.run("labels-after-the-last-window", _deliver, ctx.store, name, labellers, 10**6):
            _next_check(stages, name, clock)

        final = versions.alias_version(name, versions.CHAMPION)
        hotfix_file = ctx.settings.home_dir / "demo" / f"hotfix-poisoned-{name}.csv"
        hotfix_file.parent.mkdir(parents=True, exist_ok=True)
        final_labels = modeling.read_labels(versions.download_adapter(name, final))
        poison(data.hotfix, final_labels, spec.seed)[["text", "label"]].to_csv(hotfix_file, index=False)
        # force: the poisoned file is the same on every run, and an earlier run's refusal must not answer for this one
        hotfix = _subflow(stages, "hotfix-poisoned", update, labels_path=str(hotfix_file), force=True,
                          model_name=name)

        champion_after = versions.alias_version(name, versions.CHAMPION)
        final_scores = stages.run("score-final", _final_scores, name, v1, champion_after, golden_v1, externals)
        fates = stages.run("count-labels", _label_fates, ctx.store, name, labellers)
    except RefitError as exc:
        return user_error(exc)

    summary = summarize(v1=v1, champion_after=champion_after, quiet=quiet, shifts=outcomes, hotfix=hotfix,
                        golden_before=final_scores["golden_before"], golden_after=final_scores["golden_after"],
                        external_final=final_scores["external_final"], tracking_uri=mask_uri(ctx.settings.tracking_uri),
                        store_uri=ctx.store.uri(), stage_seconds=stages.seconds, labels=fates["labels"],
                        stage_cpu_seconds=stages.cpu_seconds,
                        labels_by_shift=fates["by_shift"], labels_requested=labellers.requested)
    summary |= cascade_figures(name, champion_after)  # the final champion's cheap tier, as its gate measured it
    summary["demo_seconds"] = round(time.perf_counter() - began, 1)
    get_run_logger().info("demo summary: %s", summary)
    return summary


class Clock:
    """The demo's windows, back to back: window 0 is the no-drift one, then each shift's windows in order, then
    a quiet one for the check after the last labels arrived."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.next = 1

    def window(self, index: int) -> tuple[datetime, datetime]:
        return self.start + WINDOW * index, self.start + WINDOW * (index + 1)

    def take(self) -> int:
        self.next += 1
        return self.next - 1


def _shift(ctx, stages: Stages, shift, k: int, clock: Clock, labellers: Labellers, seed: int) -> ShiftOutcome:
    """One shift, window after window: traffic, the labels due, the check, the labels asked for, the update."""
    name = ctx.model_name
    champion_before = versions.alias_version(name, versions.CHAMPION)
    detected, updated, promoted_after = None, None, None
    for w, part in enumerate(shift.parts(), start=1):
        index = clock.take()
        begin, end = clock.window(index)
        tag = f"{shift.name}-{w}" if shift.windows > 1 else shift.name
        champion = versions.alias_version(name, versions.CHAMPION)
        served = stages.run(f"replay-{tag}", replay_traffic, ctx.store, name, *_served_by(name, champion), champion,
                            part, begin, end, seed=seed + 100 * k + w)
        labellers.record_served(shift.name, served, part["label"])
        if shift.labelling == "all":
            labellers.label_share(served, shift.labelled_share, seed + 100 * k + w, index + shift.label_delay_windows)
        _deliver(ctx.store, name, labellers, index)
        drifted = _subflow(stages, f"monitor-{tag}", monitor, window_end=end.isoformat(),
                           window_hours=WINDOW.total_seconds() / 3600, model_name=name)
        detected = detected or (drifted if drifted.get("drift_detected") else None)
        if shift.labelling == "requested" and drifted.get("episode"):
            asked = stages.run(f"request-labels-{tag}", _request, ctx, shift.label_budget_per_window)
            labellers.ask(shift.name, asked, index + shift.label_delay_windows)
            if shift.label_delay_windows == 0:
                _deliver(ctx.store, name, labellers, index)
        if drifted["action"] == "update":
            result = _subflow(stages, f"update-{tag}", update, episode_id=drifted["episode"],
                              drift_run_id=drifted["drift_run_id"], model_name=name)
            if promoted_after is None:  # the shift's story: the first promotion that learned its labels, or its newest try
                updated = result
                promoted_after = w if result.get("promoted") and _learned_from(ctx.store, name, result, labellers,
                                                                                shift.name) else None
    return stages.run(f"score-{shift.name}", _outcome, name, shift, champion_before, detected or drifted, updated,
                      promoted_after)


def _next_check(stages: Stages, name: str, clock: Clock) -> None:
    """The scheduled check after the last window: no traffic, but the labels that arrived since count, and an
    open episode whose labels now suffice starts its update, as it would in production."""
    checked = _subflow(stages, "monitor-after-the-last-window", monitor, window_end=clock.window(clock.take())[1]
                       .isoformat(), window_hours=WINDOW.total_seconds() / 3600, model_name=name)
    if checked.get("action") == "update":
        _subflow(stages, "update-after-the-last-window", update, episode_id=checked["episode"],
                 drift_run_id=checked.get("drift_run_id"), model_name=name)


def _learned_from(store, name: str, result: dict, labellers: Labellers, shift: str) -> bool:
    """Whether the promoted update trained on (or held out) any label of this shift's requests."""
    from tasks.labels import used_keys

    used = used_keys(store, name)
    return bool(set(used[used["run_id"] == result.get("run_id")]["key"]) & set(labellers.arrived.get(shift, [])))


def _deliver(store, name: str, labellers: Labellers, window: int) -> int:
    """The labels due by ``window`` arrive, as a labelling process files them."""
    arrived = labellers.deliver(window)
    if len(arrived):
        requestlog.write_labels(store, name, arrived)
    return len(arrived)


def _request(ctx, budget: int) -> list[str]:
    """``refit labels request``: the texts refit wants labelled now, from the open episode."""
    from tasks.label_requests import request_labels

    asked = request_labels(ctx.store, ctx.experiment_id, ctx.model_name, budget, ctx.settings.home_dir)
    return asked.picks["request_id"].astype(str).tolist()


def forget_earlier_demo(ctx, name: str) -> int:
    """A second run starts the story again: the simulated data goes, and an episode left open is closed."""
    from registry import episodes

    episode = episodes.open_episode(ctx.experiment_id, name)
    if episode is not None:
        episodes.close(episode.id, "a new demo run starts the story again", "demo")
    return delete_model_data(ctx.store, name)


def _label_fates(store, name: str, labellers: Labellers) -> dict:
    """Every label that arrived, by fate: trained on, held out, waiting, or quarantined."""
    from tasks.labels import label_fates

    by_shift = {shift: label_fates(store, name, ids) for shift, ids in labellers.arrived.items()}
    everything = label_fates(store, name, [i for ids in labellers.arrived.values() for i in ids])
    return {"labels": everything, "by_shift": by_shift}


@functools.lru_cache(maxsize=2)
def _served_by(name: str, version: int) -> tuple:
    """What ``refit serve`` answers with for the version (its gated cascade, else the model alone; no tokenizer
    needed), to score simulated traffic as serving would."""
    from registry.served import load_cascade, load_version

    champion = load_version(name, version, tokenizer=modeling.load_tokenizer(versions.download_adapter(name, version)))
    return load_cascade(name, version, champion) or champion, None


def _outcome(name: str, shift, champion_before: int, drifted: dict, updated: dict | None,
             promoted_after: int | None) -> ShiftOutcome:
    """What one shift did, with the champion before and after it scored on the shift's test texts (report only)."""
    champion_after = versions.alias_version(name, versions.CHAMPION)
    scored = {v: accuracy_on(versions.download_adapter(name, v), {shift.name: shift.external})[shift.name]
              for v in {champion_before, champion_after}}
    return ShiftOutcome(shift.name, drifted, updated, scored[champion_before], scored[champion_after],
                        windows=shift.windows, promoted_after_window=promoted_after)


def _final_scores(name: str, v1: int, final: int, golden_v1, externals: dict) -> dict:
    first = accuracy_on(versions.download_adapter(name, v1), {"golden": golden_v1})
    last = accuracy_on(versions.download_adapter(name, final), {"golden": golden_v1, **externals})
    return {"golden_before": first["golden"], "golden_after": last.pop("golden"), "external_final": last}
