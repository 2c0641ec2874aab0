"""update: train a challenger warm-started from the champion, gate it, ship it.

Triggered by the ``refit.drift.detected`` event (labels of the drifted
window) or run by hand with a labelled file: the hotfix path. Either way the
new labelled rows are split into training rows and a fresh holdout: the gate
judges the improvement on the fresh holdout (the drift that happened) and
non-regression on the golden suite, which the fresh holdout joins when the
update is promoted. Labels the champion does not know grow its head once
enough rows of them arrived.
"""

from __future__ import annotations

from prefect import flow

from flows.common import one_at_a_time, open_context, settings_for, user_error
from refit.cost import StageMeters
from refit.errors import RefitError
from tasks.deploy import ship
from tasks.labels import gather_labels
from tasks.ladder import climb
from tasks.update_run import (already_updated, begin_update, clean_up, finish, learnable_rows, log_verdict,
                              nothing_trained, publish, start_dir_for, update_run)


@flow(name="update")
def update(window_start: str | None = None, window_end: str | None = None, labels_path: str | None = None,
           drift_run_id: str | None = None, gate_policy: str | None = None, reason: str | None = None,
           force: bool = False, model_name: str | None = None, episode_id: str | None = None) -> dict:
    """Fine-tune, evaluate against the champion, gate on quality and cost, promote on a pass.

    With neither a window nor a file it learns from the model's open drift
    episode: every label that arrived for it, however late, that no promoted
    update used. Too few is not a failure: the run completes with action
    ``wait for labels``, and the next check or label arrival tries again.

    One update per model runs at a time (a Prefect global concurrency limit
    named after the model: event-started updates and hand-run hotfixes queue
    behind each other), and a window or file that already paid for a
    fine-tune returns that run instead of a second one.

    Args:
        window_start: start of the drifted traffic window whose delayed labels to learn from.
        window_end: its end.
        labels_path: a CSV/Parquet/JSON file with ``text`` and ``label`` (hotfix): a path, file:// or
            s3:// URI; replaces the window.
        drift_run_id: the MLflow run of the drift check that triggered this update (lineage).
        gate_policy: a gate policy's name in ``refit/policies/`` (default ``REFIT_GATE_POLICY``); a run may not
            pass a file path, so it cannot weaken its own gate: the operator pins one with ``REFIT_GATE_POLICY``.
        reason: why this update runs (a hotfix's ticket, say); recorded on the run and the version.
        force: train even if this window or file already paid for a fine-tune (after changing the gate, say).
        model_name: which model (default ``REFIT_MODEL_NAME``); the drift event's trigger passes the event's.
        episode_id: the drift episode to learn from (default: the model's open one); the drift event passes it.
    """
    try:
        settings = settings_for(model_name)
    except RefitError as exc:
        return user_error(exc)
    try:
        with one_at_a_time(f"refit-update-{settings.model_name}"):
            return update_model(settings, window_start, window_end, labels_path, drift_run_id, gate_policy, reason,
                                force, episode_id)
    except RefitError as exc:  # the slot never came free
        return user_error(exc)


def update_model(settings, window_start, window_end, labels_path, drift_run_id, gate_policy, reason, force,
                 episode_id=None) -> dict:
    """The update, stage by stage, metered from its first label read to the alias move."""
    meters = StageMeters()
    try:
        ctx = open_context(settings)
        start = begin_update(ctx, labels_path, gate_policy)
        with meters.stage("labels"):
            labelled = gather_labels(ctx, start.policy, start.known_labels, labels_path, window_start, window_end,
                                     episode_id)
        if labelled.wait:
            return labelled.waiting(start.champion)
        earlier = None if force else already_updated(ctx, start, labelled)
        if earlier is not None:
            return earlier
        with meters.stage("labels"):
            learnable = learnable_rows(ctx, start, labelled)
    except RefitError as exc:
        return user_error(exc)
    drift_run_id = drift_run_id or (labelled.episode.opened_by if labelled.episode else None)  # arrivals name none
    with meters.stage("train"):
        start_dir = start_dir_for(ctx, start, learnable.data)
    with update_run(ctx, start, labelled, learnable, drift_run_id, reason) as run:
        run_id = run.info.run_id
        ladder = climb(ctx, run_id, start.policy, learnable.data, start.pool, start.champion_dir, start_dir,
                       start.rules, meters)
        if not ladder.attempts:
            return nothing_trained(start, ladder, run_id)
        log_verdict(ctx, start, ladder, learnable.data)
        version = ship(ctx, start, labelled, learnable, ladder, run_id, drift_run_id, reason, meters)
        result = finish(ctx, start, labelled, learnable.data, ladder, version, run_id, meters)
    clean_up(start, ladder, start_dir)
    publish(ctx, start, learnable.data, ladder, result)
    return result
