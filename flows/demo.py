"""demo: the whole loop on the default scenario, start to finish.

bootstrap → a no-drift window (monitor: nothing to do) → a shifted window
(monitor: drift, update, promotion) → a hand-run hotfix with poisoned labels
(the gate refuses it and the champion stays). On a Prefect server the update
starts from the drift event; here the demo starts it when the monitor says so.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from prefect import flow
from prefect.logging import get_run_logger
from prefect.states import State

from flows.bootstrap import bootstrap
from flows.common import open_context, user_error
from flows.monitor import monitor
from flows.update import update
from refit import modeling
from refit.errors import RefitError
from refit.settings import Settings
from refit.scenario import build, load_scenario, load_source, poison
from registry import versions
from tasks.ingest import replay_traffic


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
def demo(scenario: str | None = None) -> dict:
    """Run the loop and return the summary the CLI prints with ``--json``."""
    try:
        settings = Settings()
        spec, _ = load_scenario(scenario or settings.scenario)
        data = build(spec, load_source(spec.source, settings.data_dir))
        ctx = open_context(settings)
    except RefitError as exc:
        return user_error(exc)
    stages = Stages()
    name = ctx.model_name
    try:
        boot = _subflow(stages, "bootstrap", bootstrap, scenario=scenario)
        v1 = boot["version"]
        model = modeling.load_model(versions.download_adapter(name, v1))
        tokenizer = modeling.load_tokenizer()

        now = datetime.now(timezone.utc).replace(microsecond=0)
        quiet_start, shift_start = now - timedelta(minutes=20), now - timedelta(minutes=10)
        stages.run("replay-no-drift", replay_traffic, ctx.store, name, model, tokenizer, v1,
                   data.no_drift_window, quiet_start, shift_start, seed=spec.seed)
        quiet = _subflow(stages, "monitor-no-drift", monitor, window_end=shift_start.isoformat(),
                         window_hours=(shift_start - quiet_start).total_seconds() / 3600)

        stages.run("replay-shift", replay_traffic, ctx.store, name, model, tokenizer, v1, data.shifted_window,
                   shift_start, now, labelled_share=spec.windows.labelled_share, seed=spec.seed + 1)
        drifted = _subflow(stages, "monitor-shift", monitor, window_end=now.isoformat(),
                           window_hours=(now - shift_start).total_seconds() / 3600)
        if drifted["action"] != "update":
            raise RefitError(f"the shifted window did not start an update (action: {drifted['action']})")
        updated = _subflow(stages, "update", update, window_start=shift_start.isoformat(),
                           window_end=now.isoformat(), drift_run_id=drifted["drift_run_id"])

        hotfix_file = ctx.settings.home_dir / "demo" / "hotfix-poisoned.csv"
        hotfix_file.parent.mkdir(parents=True, exist_ok=True)
        poison(data.hotfix, data.labels, spec.seed)[["text", "label"]].to_csv(hotfix_file, index=False)
        hotfix = _subflow(stages, "hotfix-poisoned", update, labels_path=str(hotfix_file))
    except RefitError as exc:
        return user_error(exc)

    summary = {
        "champion_before": v1,
        "champion_after": versions.alias_version(name, versions.CHAMPION),
        "no_drift_window_triggered": quiet["action"] != "none",
        "drift_detected_on_shift": bool(drifted["drift_detected"]),
        "shifted_accuracy_before": round(updated["shifted_accuracy_before"], 4),
        "shifted_accuracy_after": round(updated["shifted_accuracy_after"], 4),
        "golden_accuracy_before": round(updated["golden_accuracy_before"], 4),
        "golden_accuracy_after": round(updated["golden_accuracy_after"], 4),
        "update_promoted": updated["promoted"],
        "update_verdict": updated["verdict"],
        "poisoned_hotfix_promoted": hotfix["promoted"],
        "poisoned_hotfix_verdict": hotfix["verdict"],
        "update_attempts": [a["recipe"] for a in updated.get("attempts", [])],
        "update_cpu_seconds": updated["cpu_seconds"],
        "update_cost_usd": updated["cost_usd"],
        "mlflow_tracking_uri": ctx.settings.tracking_uri,
        "store_uri": ctx.store.uri(),
        "stage_seconds": stages.seconds,
    }
    get_run_logger().info("demo summary: %s", summary)
    return summary
