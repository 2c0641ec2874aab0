"""The episode stage: follow a drift across windows, count its labels, say when an update can start.

A check whose window drifted opens the model's episode or joins it. Whether
or not this window drifted, an open episode's labels are counted (every
labelled row since it began, however late it arrived, less what promoted
updates used) and the one rule for "enough" (``tasks.labels.enough``)
decides between ``wait for labels`` and ``update``. An update that started
for the episode is not started again until more labels arrived, so one
episode costs one update at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pandas as pd

from refit.store import ObjectStore
from registry import episodes
from registry.episodes import Episode
from tasks.labels import Enough, enough, episode_labels, labels_since


@dataclass(frozen=True)
class Decision:
    """What a check decided: the action, why, the episode it followed and the labels it counted."""

    action: str
    reason: str
    episode: Episode | None = None
    opened: bool = False
    labels: Enough | None = None

    def to_dict(self) -> dict:
        labels = self.labels
        return {"action": self.action, "action_reason": self.reason,
                "episode": self.episode.id if self.episode else None,
                "episode_opened": self.opened, "episode_windows": self.episode.windows if self.episode else 0,
                "labelled_rows": labels.usable if labels else 0, "labels_enough": bool(labels and labels.ok)}


def decide(episode: Episode | None, counted: Enough | None, min_new_examples: int) -> tuple[str, str]:
    """``none``, ``wait for labels`` or ``update``, and why."""
    if episode is None or counted is None:
        return "none", "no drift"
    where = f"drift episode open since {episode.start} ({episode.windows} drifted window(s), {episode.severity})"
    if not counted.ok:
        return "wait for labels", f"{where}: {counted.reason}"
    if episode.tried_labels >= 0 and counted.usable < episode.tried_labels + min_new_examples:
        return "wait for labels", (f"{where}: an update for it started with {episode.tried_labels} usable labels; "
                                   f"the next starts at {episode.tried_labels + min_new_examples} "
                                   f"({counted.usable} now)")
    return "update", f"{where}: {counted.reason}"


def follow(store: ObjectStore, experiment_id: str, model_name: str, drift_detected: bool, severity: str,
           window_start: str, window_end: str, champion: int, drift_run_id: str, known_labels: list[str],
           policy, until: datetime, seed: int = 0) -> Decision:
    """Join or open the episode on drift, then count the open episode's labels and decide."""
    opened = False
    episode = episodes.open_episode(experiment_id, model_name)
    if drift_detected:
        episode, opened = episodes.join_or_open(experiment_id, model_name, window_start, window_end, severity,
                                                champion, drift_run_id)
    elif episode is not None:
        from mlflow import MlflowClient

        MlflowClient().set_tag(drift_run_id, "refit.episode_id", episode.id)
    if episode is None:
        return Decision("none", "no drift")
    counted = count(store, experiment_id, model_name, episode, known_labels, policy, until, seed)
    action, why = decide(episode, counted, policy.min_new_examples)
    return Decision(action, why, episode, opened, counted)


def count(store: ObjectStore, experiment_id: str, model_name: str, episode: Episode, known_labels: list[str],
          policy, until: datetime, seed: int = 0) -> Enough:
    """The episode's labels not used yet, judged by the rule an update applies."""
    rows = episode_labels(store, model_name, labels_since(experiment_id, episode), until).rows
    return enough(rows if len(rows) else pd.DataFrame(columns=["text", "label"]), known_labels, policy, seed)


def record_check(verdict: dict, result, validated) -> None:
    """The drift check's metrics, report, verdict and tags, on the active MLflow run.

    ``refit.action`` says ``update (event not sent)`` until the event is out
    (``tasks.monitor.emit_then_mark`` sets ``update``): a check whose event
    never left is not a trigger.
    """
    import mlflow

    from registry.tracking import log_json

    metrics = {f"signal_{n}": s.value for n, s in result.signals.items()}
    metrics |= {"rows_in": validated.rows_in, "rows_kept": len(validated.kept),
                "rows_quarantined": validated.rows_quarantined, "drift_detected": float(result.drift_detected),
                "labelled_rows": verdict["labelled_rows"]}
    if verdict.get("student_share") is not None:
        metrics["student_share"] = verdict["student_share"]
    mlflow.log_metrics(metrics)
    mlflow.log_text(result.report_html, "drift_report.html")
    log_json(verdict, "verdict.json")
    action = verdict["action"]
    mlflow.set_tags({"refit.drift_detected": str(result.drift_detected), "refit.severity": result.severity,
                     "refit.action": EVENT_NOT_SENT if action == "update" else action})


EVENT_NOT_SENT = "update (event not sent)"


def check_markdown(name: str, verdict: dict, result) -> str:
    rows = "".join(
        f"| {s.name} | {s.value:.4f} | {s.direction} {s.threshold:.4g} | {'**yes**' if s.drifted else 'no'} |\n"
        for s in result.signals.values())
    episode = (f"Drift episode `{verdict['episode']}` ({'opened by this check' if verdict['episode_opened'] else 'open'}"
               f", {verdict['episode_windows']} drifted window(s)): {verdict['labelled_rows']} usable labels so far.\n\n"
               if verdict.get("episode") else "")
    return (f"# Drift check for {name}: {'DRIFT' if result.drift_detected else 'no drift'}\n\n"
            f"Severity **{result.severity}**, action **{verdict['action']}** ({verdict['action_reason']}). "
            f"Window `{verdict['window_uri']}`: {verdict['rows_in']} rows in, {verdict['rows_quarantined']} "
            f"quarantined.\n\n{episode}"
            f"| signal | value | threshold | drifted |\n|---|---|---|---|\n{rows}")
