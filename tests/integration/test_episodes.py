"""Drift episodes over a real object store (local directory and the S3 endpoint) and a real MLflow store.

Labels trickle in, late: the episode counts every one that arrived for any
of its windows, the monitor and the update share one rule for "enough", a
promoted update's labels are used once, and labels that arrive after their
episode closed wait for the next one. No model is trained here: the
monitor's and update's own stage functions are called on a planted request
log.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from refit import requestlog
from registry import episodes
from registry.tracking import RUN_TYPE
from tasks.episodes import decide, follow
from tasks.finetune import load_update_policy
from tasks.labels import enough, episode_labels, label_fates, labels_since, record_used

NAME = "m"
KNOWN = ["balance", "transfer"]
T0 = datetime(2026, 11, 2, 8, 0, tzinfo=timezone.utc)
WINDOW = timedelta(hours=1)


@pytest.fixture
def experiment(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield MlflowClient().create_experiment("refit", artifact_location=str(tmp_path / "artifacts"))
    mlflow.set_tracking_uri(None)


def _serve(store, window: int, n: int, label: str) -> pd.DataFrame:
    """``n`` requests in window ``window``, each with the true label ``label`` (known to the test only)."""
    start = T0 + WINDOW * window
    times = [start + timedelta(seconds=5 * i + 1) for i in range(n)]
    rows = pd.DataFrame({
        "request_id": [requestlog.new_request_id(t) for t in times], "timestamp": pd.to_datetime(times),
        "text": [f"{label} question {window}-{i}" for i in range(n)], "predicted_label": "balance",
        "confidence": 0.5, "model_version": "1", "served_by": "champion"})
    requestlog.write_inference(store, NAME, rows)
    return rows.assign(truth=label)


def _label(store, served: pd.DataFrame) -> None:
    requestlog.write_labels(store, NAME, pd.DataFrame({"request_id": served["request_id"], "label": served["truth"],
                                                       "source": "delayed-feedback"}))


def _check(experiment_id: str, window: int) -> str:
    with mlflow.start_run(experiment_id=experiment_id, tags={RUN_TYPE: "drift-check", "refit.model": NAME}) as run:
        pass
    return run.info.run_id


def _follow(store, experiment_id, window: int, drifted: bool, policy):
    start, end = T0 + WINDOW * window, T0 + WINDOW * (window + 1)
    return follow(store, experiment_id, NAME, drifted, "high" if drifted else "none", start.isoformat(),
                  end.isoformat(), 1, _check(experiment_id, window), KNOWN, policy, end)


@pytest.fixture
def policy():
    policy, _ = load_update_policy()
    return policy.model_copy(update={"min_new_examples": 30, "min_fresh_rows": 8, "fresh_holdout_share": 0.25,
                                     "min_examples_per_new_label": 3})


def test_late_labels_are_counted_over_the_episode_until_enough_then_update(store, experiment, policy):
    quiet = _follow(store, experiment, 0, False, policy)
    assert (quiet.action, quiet.episode) == ("none", None)

    w1 = _serve(store, 1, 40, "transfer")
    first = _follow(store, experiment, 1, True, policy)  # drift; its labels have not arrived
    assert first.opened and first.action == "wait for labels" and first.labels.usable == 0

    w2 = _serve(store, 2, 40, "transfer")
    _label(store, w1.iloc[:20])  # window 1's labels, one window late, a few
    second = _follow(store, experiment, 2, True, policy)
    assert not second.opened and second.episode.id == first.episode.id and second.episode.windows == 2
    assert second.action == "wait for labels" and second.labels.usable == 20  # counted, not lost with window 1

    _label(store, w2.iloc[:15])
    _label(store, w1.iloc[20:25])  # later still: window 1 again
    third = _follow(store, experiment, 3, False, policy)  # a quiet window: the open episode still counts
    assert third.episode.id == first.episode.id and third.episode.windows == 2
    assert third.action == "update" and third.labels.usable == 40

    # The update reads the same rows through the same rule.
    episode = episodes.get_episode(first.episode.id)
    rows = episode_labels(store, NAME, labels_since(experiment, episode), T0 + WINDOW * 4, KNOWN).rows
    assert len(rows) == 40 and enough(rows, KNOWN, policy).ok


def test_a_promoted_update_uses_labels_once_and_late_ones_wait_for_the_next_episode(store, experiment, policy):
    w1 = _serve(store, 1, 60, "transfer")
    opened = _follow(store, experiment, 1, True, policy)
    _label(store, w1.iloc[:40])
    episode = episodes.get_episode(opened.episode.id)
    rows = episode_labels(store, NAME, labels_since(experiment, episode), T0 + WINDOW * 2, KNOWN).rows
    record_used(store, NAME, "run-1", rows, rows["text"].iloc[:10])
    episodes.close(episode.id, "v2 promoted", "v2")
    assert not episodes.get_episode(episode.id).is_open and episodes.open_episode(experiment, NAME) is None

    _label(store, w1.iloc[40:])  # window 1's last labels arrive after its episode closed
    w3 = _serve(store, 3, 30, "balance")
    _label(store, w3)
    nxt = _follow(store, experiment, 3, True, policy)
    assert nxt.opened and nxt.episode.id != episode.id
    assert nxt.labels.usable == 20 + 30  # the late ones are kept; the used 40 are not counted again
    found = episode_labels(store, NAME, labels_since(experiment, nxt.episode), T0 + WINDOW * 4, KNOWN)
    assert set(found.held_out_before["text"]) == set(rows["text"].iloc[:10])  # judged on again, never trained on

    fates = label_fates(store, NAME, list(w1["request_id"]) + list(w3["request_id"]))
    assert fates == {"arrived": 90, "trained": 30, "held_out": 10, "waiting": 50, "quarantined": 0}


def test_an_update_that_started_is_not_started_again_until_more_labels_arrive(store, experiment, policy):
    w1 = _serve(store, 1, 80, "transfer")
    _label(store, w1.iloc[:40])
    first = _follow(store, experiment, 1, True, policy)
    assert first.action == "update"
    episodes.record_try(first.episode.id, first.labels.usable)  # its update started (event delivered) or was refused
    again = _follow(store, experiment, 2, False, policy)
    assert again.action == "wait for labels" and "started with 40" in again.reason
    _label(store, w1.iloc[40:])
    assert _follow(store, experiment, 3, False, policy).action == "update"  # 80 usable: 40 more than its try


def test_new_labels_count_once_they_have_enough_texts(store, experiment, policy):
    rows = pd.DataFrame({"text": [f"t{i}" for i in range(40)], "label": ["balance"] * 34 + ["new_a"] * 2 + ["new_b"] * 4})
    counted = enough(rows, KNOWN, policy)
    assert counted.usable == 38  # new_a has 2 texts, below min_examples_per_new_label=3: it waits
    assert decide(None, None, 30) == ("none", "no drift")
