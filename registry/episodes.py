"""Drift episodes: one detected drift, followed across windows until an update trained on it is promoted.

A window whose check found drift opens an episode for the model, or joins
the one already open. The episode stays open while labels trickle in, window
after window, and closes when an update trained on its labels is promoted,
or when a person closes it (``refit episode close``). Labels are counted over
the episode, never over one window, so a window whose check had to wait for
labels is never lost.

Each episode is an MLflow run of the model's experiment (run type
``drift-episode``, ended at once: its state lives in tags), so the MLflow UI
lists every episode beside the drift checks that joined it:

- ``refit.episode_status``: ``open`` or ``closed``;
- ``refit.episode_start`` / ``refit.episode_window_end``: the first joined
  window's start and the newest joined window's end (ISO, UTC);
- ``refit.episode_windows``: how many drifted windows joined;
- ``refit.severity``: the highest severity seen;
- ``refit.champion_version``: the champion when it opened;
- ``refit.episode_tried_labels``: usable labels counted when its newest update
  started (an update is tried again only once more labels arrived);
- ``refit.closed_reason``, ``refit.closed_by``: why and by whom it closed.

Only the monitor opens episodes, and one monitor per model runs at a time,
so a model has at most one open episode.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow import MlflowClient

from registry.tracking import RUN_TYPE

EPISODE = "drift-episode"
OPEN, CLOSED = "open", "closed"
SEVERITY_RANK = {"none": 0, "low": 1, "high": 2}


@dataclass(frozen=True)
class Episode:
    id: str
    model_name: str
    status: str
    start: str
    window_end: str
    windows: int
    severity: str
    champion: int
    tried_labels: int
    closed_reason: str
    opened_by: str = ""  # the drift check that opened it

    @property
    def is_open(self) -> bool:
        return self.status == OPEN

    def to_dict(self) -> dict:
        return {"episode": self.id, "status": self.status, "start": self.start, "window_end": self.window_end,
                "windows": self.windows, "severity": self.severity, "champion_version": self.champion,
                "tried_labels": self.tried_labels, "closed_reason": self.closed_reason}


def _episode(run) -> Episode:
    tags = run.data.tags
    return Episode(run.info.run_id, tags.get("refit.model", ""), tags.get("refit.episode_status", CLOSED),
                   tags.get("refit.episode_start", ""), tags.get("refit.episode_window_end", ""),
                   int(tags.get("refit.episode_windows", "0")), tags.get("refit.severity", "none"),
                   int(tags.get("refit.champion_version", "0")), int(tags.get("refit.episode_tried_labels", "-1")),
                   tags.get("refit.closed_reason", ""), tags.get("refit.opened_by", ""))


def episodes(experiment_id: str, model_name: str, status: str | None = None, newest: int = 50) -> list[Episode]:
    """The model's episodes, newest first (``status``: only open or only closed ones)."""
    where = f"tags.`{RUN_TYPE}` = '{EPISODE}' and tags.`refit.model` = '{model_name}'"
    if status:
        where += f" and tags.`refit.episode_status` = '{status}'"
    runs = MlflowClient().search_runs([experiment_id], filter_string=where,
                                      order_by=["attributes.start_time DESC"], max_results=newest)
    return [_episode(r) for r in runs]


def open_episode(experiment_id: str, model_name: str) -> Episode | None:
    """The model's open episode, if one is."""
    found = episodes(experiment_id, model_name, OPEN, newest=1)
    return found[0] if found else None


def get_episode(episode_id: str) -> Episode:
    return _episode(MlflowClient().get_run(episode_id))


def join_or_open(experiment_id: str, model_name: str, window_start: str, window_end: str, severity: str,
                 champion: int, drift_run_id: str) -> tuple[Episode, bool]:
    """Add a drifted window to the model's open episode, or open one with it. Returns (episode, opened).

    The drift check's run is tagged with the episode, and the episode keeps
    the newest window's end and the highest severity seen.
    """
    client = MlflowClient()
    current = open_episode(experiment_id, model_name)
    if current is None:
        run = client.create_run(experiment_id, run_name=f"episode {window_start[:16]}", tags={
            RUN_TYPE: EPISODE, "refit.model": model_name, "refit.episode_status": OPEN,
            "refit.episode_start": window_start, "refit.episode_window_end": window_end,
            "refit.episode_windows": "1", "refit.severity": severity, "refit.champion_version": str(champion),
            "refit.episode_tried_labels": "-1", "refit.opened_by": drift_run_id})
        client.set_terminated(run.info.run_id)
        client.set_tag(drift_run_id, "refit.episode_id", run.info.run_id)
        return get_episode(run.info.run_id), True
    worse = SEVERITY_RANK.get(severity, 0) > SEVERITY_RANK.get(current.severity, 0)
    client.set_tag(current.id, "refit.episode_windows", str(current.windows + 1))
    client.set_tag(current.id, "refit.episode_window_end", max(current.window_end, window_end))
    if worse:
        client.set_tag(current.id, "refit.severity", severity)
    client.set_tag(drift_run_id, "refit.episode_id", current.id)
    return get_episode(current.id), False


def record_try(episode_id: str, labels: int) -> None:
    """An update for the episode started with ``labels`` usable labels: the next try needs more."""
    MlflowClient().set_tag(episode_id, "refit.episode_tried_labels", str(labels))


def close(episode_id: str, reason: str, closed_by: str) -> Episode:
    """Close an episode (an update trained on it was promoted, or a person said so). Closing twice is a no-op."""
    client = MlflowClient()
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if get_episode(episode_id).is_open:
        client.set_tag(episode_id, "refit.closed_reason", reason[:5000])
        client.set_tag(episode_id, "refit.closed_by", closed_by)
        client.set_tag(episode_id, "refit.closed_at", now)
        client.set_tag(episode_id, "refit.episode_status", CLOSED)
    return get_episode(episode_id)
