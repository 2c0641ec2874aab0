"""Labels over an episode: every label that arrived for its windows, however late, that no update used yet.

Production labels a few percent of traffic, days later. So an update does
not read one window's labels: it reads every labelled request (and every
imported example) since its episode began, or since the episode before it
began, and takes the ones no promoted update trained or judged on yet. A
label that arrives after its episode closed is kept for the next update.

Which labels a promoted update used is a ledger in the object store, one
file per update run::

    labels/model=<name>/used/<update run id>.parquet    key, role (trained | held_out), run_id

A key is the request id of a served request's label, ``text:<hash>`` of an
imported example. A refused update writes nothing: its labels wait for the
next try, with more beside them.

"Enough labels" is one rule (``enough``), used by the monitor to decide to
start an update and by the update before it pays for training. Not enough
is a normal state: the monitor says ``wait for labels``, the update ends
completed with the same action.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone

import pandas as pd

from refit.data import text_hash, text_keys
from refit.errors import RefitError
from refit.store import ObjectStore

ROLES = ("trained", "held_out")


def used_prefix(model_name: str) -> str:
    return f"labels/model={model_name}/used/"


def label_keys(rows: pd.DataFrame) -> pd.Series:
    """One key per labelled row: its request id, or ``text:<hash>`` for an example that was never served."""
    texts = "text:" + rows["text"].astype(str).map(text_hash)
    if "request_id" not in rows.columns:
        return texts
    ids = rows["request_id"]
    return ids.where(ids.notna() & (ids.astype(str) != ""), texts).astype(str)


def used_keys(store: ObjectStore, model_name: str) -> pd.DataFrame:
    """Every key a promoted update used, with its role and run."""
    used = store.read_parquet_prefix(used_prefix(model_name))
    return used if len(used) else pd.DataFrame(columns=["key", "role", "run_id"])


def record_used(store: ObjectStore, model_name: str, run_id: str, rows: pd.DataFrame, held_out_texts) -> str:
    """Write the ledger entry of a promoted update: each of ``rows`` trained on or held out (by text)."""
    held = set(text_keys(held_out_texts))
    roles = text_keys(rows["text"]).isin(held).map({True: "held_out", False: "trained"})
    ledger = pd.DataFrame({"key": label_keys(rows).to_numpy(), "role": roles.to_numpy(), "run_id": run_id})
    return store.put_parquet(f"{used_prefix(model_name)}{run_id}.parquet", ledger.drop_duplicates("key"))


@dataclass(frozen=True)
class EpisodeLabels:
    """Labelled rows for an update: ``rows`` not used yet (text, label, timestamp, key), and how many were.

    ``held_out_before``: the rows since ``since`` that an earlier promoted
    update held out (judged on, never trained on): no update trains on them,
    but a later one on the same labels may be judged on them too.
    """

    rows: pd.DataFrame
    since: datetime
    already_used: int
    held_out_before: pd.DataFrame | None = None


def episode_labels(store: ObjectStore, model_name: str, since: datetime, until: datetime,
                   known_labels: list[str] | None = None, max_label_mix_shift: float | None = None) -> EpisodeLabels:
    """Labelled requests served in ``[since, until)`` and examples imported then, less those a promoted update used."""
    from tasks.ingest import labelled_window  # Prefect and the model stack: only where labels are joined

    rows = labelled_window.fn(store, model_name, since, until, known_labels=known_labels,
                           max_label_mix_shift=max_label_mix_shift)
    rows = rows.assign(key=label_keys(rows)).drop_duplicates("key", keep="last")
    used = used_keys(store, model_name)
    fresh = rows[~rows["key"].isin(set(used["key"]))].reset_index(drop=True)
    held_out = rows[rows["key"].isin(set(used.loc[used["role"] == "held_out", "key"]))].reset_index(drop=True)
    return EpisodeLabels(fresh, since, len(rows) - len(fresh), held_out)


def usable(rows: pd.DataFrame, known_labels: list[str], min_examples_per_new_label: int) -> pd.DataFrame:
    """Rows an update can learn from: labels the champion knows, and new labels with enough distinct texts."""
    known = rows["label"].isin(set(known_labels))
    counts = rows[~known].drop_duplicates("text")["label"].value_counts()
    ready = set(counts[counts >= min_examples_per_new_label].index)
    return rows[known | rows["label"].isin(ready)]


@dataclass(frozen=True)
class Enough:
    ok: bool
    usable: int
    fresh: int
    reason: str


def enough(rows: pd.DataFrame, known_labels: list[str], policy, seed: int = 0) -> Enough:
    """Whether an update can be judged on these labels: the one rule monitor and update share.

    ``policy`` is the update policy: at least ``min_new_examples`` usable
    rows, and a fresh holdout of at least ``min_fresh_rows`` of them.
    """
    from refit.evalsets import split_fresh

    rows = usable(rows, known_labels, policy.min_examples_per_new_label)
    fresh = len(split_fresh(rows, policy.fresh_holdout_share, seed)[1]) if len(rows) else 0
    if len(rows) < policy.min_new_examples:
        return Enough(False, len(rows), fresh, f"{len(rows)} usable labelled rows, an update needs "
                                               f"min_new_examples={policy.min_new_examples}")
    if fresh < policy.min_fresh_rows:
        return Enough(False, len(rows), fresh, f"{fresh} fresh rows would be held out of {len(rows)} usable labelled "
                                               f"rows, an update needs min_fresh_rows={policy.min_fresh_rows}")
    return Enough(True, len(rows), fresh, f"{len(rows)} usable labelled rows ({fresh} to hold out)")


def labels_since(experiment_id: str, episode) -> datetime:
    """Where an episode's label count starts: the start of the episode before it (labels that arrived after
    that one closed are kept for this one), else this episode's own start."""
    from registry.episodes import episodes

    starts = [e.start for e in episodes(experiment_id, episode.model_name, newest=2) if e.id != episode.id
              and e.start and e.start < episode.start]
    first = datetime.fromisoformat(starts[0] if starts else episode.start)
    return first if first.tzinfo else first.replace(tzinfo=timezone.utc)


def label_fates(store: ObjectStore, model_name: str, request_ids) -> dict[str, int]:
    """What became of these labelled requests: ``trained`` on or ``held_out`` by a promoted update,
    ``quarantined`` (refused rows or batches), or ``waiting`` for an update; ``arrived`` is their sum."""
    ids = pd.Series(list(dict.fromkeys(str(i) for i in request_ids)), dtype=object)
    roles = used_keys(store, model_name).drop_duplicates("key").set_index("key")["role"]
    role = ids.map(roles)
    quarantine = store.read_parquet_prefix(f"quarantine/model={model_name}/labels/")
    refused = set(quarantine["request_id"].astype(str)) if "request_id" in quarantine.columns else set()
    quarantined = role.isna() & ids.isin(refused)
    fates = {"arrived": len(ids), "trained": int((role == "trained").sum()),
             "held_out": int((role == "held_out").sum()), "waiting": 0, "quarantined": int(quarantined.sum())}
    fates["waiting"] = fates["arrived"] - fates["trained"] - fates["held_out"] - fates["quarantined"]
    return fates


@dataclass(frozen=True)
class Labelled:
    """What an update learns from: its rows and where they came from, or why it waits instead."""

    source: str = ""
    rows: pd.DataFrame | None = None
    trigger_key: str = ""  # one update per key: the file's contents, the window, or the episode's label keys
    episode: object | None = None  # registry.episodes.Episode
    wait: tuple[str, str] | None = None  # (action, why) when there is nothing to learn yet
    usable: int = 0
    unlabelled: tuple[str, ...] = ()  # the episode's served texts nobody labelled: pseudo-labels may use them
    judged_too: pd.DataFrame | None = None  # rows of these labels an earlier update held out: judged on again

    def waiting(self, champion: int) -> dict:
        """The update's result when it waits (a completed run, not a failure), said in the run's log."""
        from prefect.logging import get_run_logger

        get_run_logger().info(f"{self.wait[0]}: {self.wait[1]}")
        return {"action": self.wait[0], "promoted": False, "version": None, "champion": champion,
                "reason": self.wait[1], "episode": self.episode.id if self.episode else None, "attempts": []}


def gather_labels(ctx, policy, known_labels: list[str], labels_path: str | None, window_start: str | None,
                  window_end: str | None, episode_id: str | None) -> Labelled:
    """The update's labelled rows: a hand-supplied file (hotfix), one window, or the drift episode's labels."""
    from refit.data import fingerprint
    from tasks.context import parse_time
    from tasks.ingest import labelled_window, read_labelled_file

    name = ctx.model_name
    if labels_path:
        arrived = read_labelled_file(labels_path, ctx.settings)
        return Labelled(labels_path, arrived, f"{name}:file:{fingerprint(arrived)}")
    if window_start or window_end:
        if not (window_start and window_end):
            raise RefitError("give a whole window (window_start and window_end), a labelled file (labels_path), "
                             "or neither to learn from the open drift episode")
        start, end = parse_time(window_start), parse_time(window_end)
        arrived = labelled_window(ctx.store, name, start, end, known_labels=known_labels,
                                  max_label_mix_shift=policy.max_label_mix_shift)
        return Labelled(f"labelled requests {start.isoformat()} .. {end.isoformat()}", arrived,
                        f"{name}:window:{window_start}..{window_end}")
    return _episode_labelled(ctx, policy, known_labels, episode_id)


def _episode_labelled(ctx, policy, known_labels: list[str], episode_id: str | None) -> Labelled:
    """The open (or named) episode's unused labels, if they meet ``enough``; else why the update waits."""
    from refit import requestlog
    from registry import episodes
    from tasks.context import parse_time

    name = ctx.model_name
    episode = episodes.get_episode(episode_id) if episode_id else episodes.open_episode(ctx.experiment_id, name)
    if episode is None or not episode.is_open:
        why = f"drift episode {episode_id} is closed" if episode else f"model {name} has no open drift episode"
        return Labelled(episode=episode, wait=("none", f"{why}: nothing to learn"))
    since, now = labels_since(ctx.experiment_id, episode), parse_time(None)
    found = episode_labels(ctx.store, name, since, now, known_labels, policy.max_label_mix_shift)
    rows = found.rows
    counted = enough(rows, known_labels, policy, ctx.settings.seed)
    if not counted.ok:
        return Labelled(episode=episode, wait=("wait for labels", f"drift episode {episode.id}: {counted.reason}"))
    keys = hashlib.sha256("\n".join(sorted(rows["key"])).encode()).hexdigest()[:16]
    served = requestlog.read_inference(ctx.store, name, since, now)["text"].astype(str)
    unlabelled = tuple(dict.fromkeys(served[~served.isin(set(rows["text"].astype(str)))]))
    # The same labels' rows that the update before this one held out: never trained on by either model, they
    # judge this update's gain too, so a follow-up on a few more labels is not judged on a dozen rows alone.
    before = found.held_out_before
    judged_too = before[before["label"].isin(set(rows["label"]))] if before is not None and len(before) else None
    return Labelled(f"drift episode {episode.id}: labelled requests since {since.isoformat()}", rows,
                    f"{name}:episode:{episode.id}:{keys}", episode, usable=counted.usable, unlabelled=unlabelled,
                    judged_too=judged_too)
