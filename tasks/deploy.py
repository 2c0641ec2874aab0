"""Deploy: write the champion's reference snapshot, move the aliases, tell the server.

Promotion is guarded: ``champion`` moves only if it still points at the
version the gate compared against. The old champion becomes ``previous``,
which is where rollback returns to. The running server is then told to load
the new champion (``REFIT_SERVE_URL``); it serves it as a canary and rolls it
back on its own if a live guard fails (``serving/rollout.py``). A server that
cannot be reached is not an error here: its alias poll finds the change.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from refit import faults, modeling
from refit.settings import Settings
from refit.store import ObjectStore
from registry import versions
from tasks.retry import RETRY

REFERENCE_SAMPLE_ROWS = 1000
# Fewer held-out rows than this: the reference is sampled from the training rows (its champion signals then only
# report, never count: confidences on rows a model was trained on run high).
REFERENCE_MIN_HELD_OUT_ROWS = 300


def reference_prefix(model_name: str, version: int) -> str:
    return f"reference/model={model_name}/version={version}/"


@task(name="write-reference", cache_policy=NO_CACHE, **RETRY)
def write_reference(store: ObjectStore, model_name: str, version: int, model, tokenizer,
                    pool: pd.DataFrame, trained_on: pd.DataFrame, seed: int = 0,
                    held_out: pd.DataFrame | None = None, answers: Mapping[str, tuple[str, float]] | None = None
                    ) -> str:
    """Snapshot what drift is measured against, and what later updates replay.

    ``sample.parquet``: up to 1,000 labelled rows the version was judged on
    but never trained on (``held_out``: its golden suite and fresh holdout),
    with its own predictions and ``scored_on = held_out``, so the champion's
    confidence signals count toward the drift verdict; with fewer than
    ``REFERENCE_MIN_HELD_OUT_ROWS`` of them, rows it was trained on
    (``scored_on = training``: those signals then only report).
    ``pool.parquet``: every labelled row the lineage has learned so far, the
    replay source for the next update.
    ``answers``: text -> (label, confidence) the version answered as served
    (``Evaluation.answers``, on the sets that judged it); only the sampled
    texts it did not answer there run through ``model``.
    """
    from tasks.drift import HELD_OUT, SCORED_ON

    source, scored_on = trained_on, "training"
    if held_out is not None and len(held_out) >= REFERENCE_MIN_HELD_OUT_ROWS:
        source, scored_on = held_out, HELD_OUT
    sample = source.sample(n=min(REFERENCE_SAMPLE_ROWS, len(source)), random_state=seed)
    predicted, confidence = _predictions(model, tokenizer, sample["text"].tolist(), answers or {})
    snapshot = pd.DataFrame({"text": sample["text"].to_numpy(), "label": sample["label"].to_numpy(),
                             "predicted_label": predicted, "confidence": confidence.astype(float),
                             SCORED_ON: scored_on})
    prefix = reference_prefix(model_name, version)
    store.put_parquet(prefix + "pool.parquet", pool[["text", "label"]].reset_index(drop=True))
    faults.point("update.reference_write")
    store.put_parquet(prefix + "sample.parquet", snapshot)
    return store.uri(prefix)


def _predictions(model, tokenizer, texts: list[str], answers: Mapping[str, tuple[str, float]]
                 ) -> tuple[list[str], np.ndarray]:
    missing = [t for t in dict.fromkeys(texts) if t not in answers]
    if missing:
        answers = dict(answers) | dict(zip(missing, zip(*modeling.predict(model, tokenizer, missing))))
    return [answers[t][0] for t in texts], np.array([answers[t][1] for t in texts], dtype=np.float64)


def read_reference(store: ObjectStore, model_name: str, version: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The version's (sample, pool) snapshot."""
    prefix = reference_prefix(model_name, version)
    return store.get_parquet(prefix + "sample.parquet"), store.get_parquet(prefix + "pool.parquet")


@task(name="register", cache_policy=NO_CACHE, **RETRY)
def register_version(model_name: str, run_id: str, tags: dict[str, str]) -> int:
    """Register the run's adapter as a new version; inside a transaction, undone by tagging if promotion fails."""
    from prefect.transactions import get_transaction

    version = versions.register(model_name, run_id, tags)
    versions.set_alias(model_name, versions.CHALLENGER, version)
    txn = get_transaction()
    if txn is not None:
        txn.set("registered", [model_name, version])
    return version


@register_version.on_rollback
def _abandon_version(txn) -> None:
    """The steps after registering failed: mark the version so nobody mistakes it for a deployable one.

    Before the promotion, ``champion`` never moved, so the registry stays
    consistent; the version keeps its gate verdict and is tagged
    ``refit.deployed = abandoned`` with the reason. If the alias did move
    (a stop inside or after the promotion), the version is the champion and
    is recorded as one: the alias is the truth.
    """
    model_name, version = txn.get("registered")
    if versions.alias_version(model_name, versions.CHAMPION) == version:
        versions.set_tags(model_name, version, {"refit.deployed": "champion"})
        _log(f"{model_name} v{version} is champion: the promotion completed before the update stopped")
        return
    versions.set_tags(model_name, version, {"refit.deployed": "abandoned: the steps after registration failed"})
    _log(f"{model_name} v{version} abandoned: promotion did not complete")


def first_version_tags(train: pd.DataFrame, golden, trained, policy_path, golden_accuracy: float,
                       labels: int) -> dict[str, str]:
    """What the first version's page in the MLflow UI says: what it was trained on, and that no gate judged it."""
    from refit.data import fingerprint
    from refit.policy import file_hash
    from registry.tracking import code_revision

    return {
        "refit.parent_version": "none",
        "refit.train_data_fingerprint": fingerprint(train),
        **golden.tags(),
        "refit.code_revision": code_revision(),
        "refit.base_model_sha256": modeling.base_model_hash(trained.adapter_dir),
        "refit.base_model_uri": modeling.base_of(trained.adapter_dir).location or "packaged",
        "refit.policy_hash": file_hash(policy_path),
        "refit.gate_verdict": "bootstrap (no gate)",
        "refit.update_cost_usd": trained.cost.usd,
        "refit.golden_accuracy": round(golden_accuracy, 4),
        "refit.labels": str(labels),
    }


def update_version_tags(*, kind: str, reason: str | None, champion: int, run_id: str, recipe: str, attempts: int,
                        source: str, training, data, golden, drift_run_id: str | None, rules_path, verdict,
                        cost_usd: float, cpu_seconds: float, after, adapter_dir) -> dict[str, str]:
    """Everything an updated version's page in the MLflow UI says about where it came from and how it was judged."""
    from refit.data import fingerprint
    from refit.policy import file_hash
    from registry.tracking import code_revision

    return {
        "refit.parent_version": str(champion),
        "refit.kind": kind,
        "refit.reason": reason or kind,
        "refit.update_run_id": run_id,
        "refit.recipe": recipe,
        "refit.attempts": str(attempts),
        "refit.data_source": source,
        "refit.train_data_fingerprint": training.fingerprint,
        "refit.drift_run_id": drift_run_id or "none",
        "refit.code_revision": code_revision(),
        "refit.base_model_sha256": modeling.base_model_hash(adapter_dir),
        "refit.base_model_uri": modeling.base_of(adapter_dir).location or "packaged",
        "refit.policy_hash": file_hash(rules_path),
        "refit.gate_verdict": "passed" if verdict.passed else "refused",
        "refit.gate_reasons": verdict.summary,
        "refit.update_cost_usd": round(cost_usd, 6),
        "refit.update_cpu_seconds": round(cpu_seconds, 2),
        "refit.artifact_bytes": str(after.artifact_bytes),
        "refit.fresh_rows": str(len(data.fresh)),
        "refit.fresh_fingerprint": fingerprint(data.fresh),
        "refit.fresh_accuracy": round(after.slices["fresh"].accuracy, 4),
        "refit.golden_accuracy": round(after.slices["golden"].accuracy, 4),
        **golden.tags(),
        "refit.new_labels": str(len(data.learned)),
        "refit.labels_learned": ", ".join(data.learned)[:5000] or "none",
    }


def promote_now(model_name: str, version: int, expected_champion: int | None,
                lease: versions.Lease | None = None) -> int | None:
    """Move ``champion`` to ``version`` (guarded, and fenced by the promotion lock's ``lease``); returns the old one."""
    previous = versions.promote(model_name, version, expected_champion, lease=lease)
    faults.point("update.promote")
    versions.set_tags(model_name, version, {"refit.deployed": "champion"})
    _log(f"{model_name} v{version} is champion; server: {notify_server()}")
    return previous


promote = task(name="promote", cache_policy=NO_CACHE, **RETRY)(promote_now)


def golden_after_promotion(store: ObjectStore, model_name: str, version: int, fresh: pd.DataFrame,
                           max_per_label: int):
    """The newest golden suite with ``version``'s fresh holdout joined, written and recorded on the version.

    Recorded as ``refit.golden_after_*``. Safe to repeat (a retried
    promotion): a version whose recorded suite is in the store, with the
    fingerprint it recorded, gets that suite back and nothing is written.
    """
    from refit.errors import RefitError
    from refit.evalsets import grow_suite, read_golden

    tags = versions.version_tags(model_name, version)
    done = tags.get("refit.golden_after_version", "")
    if done.isdigit():
        try:
            golden = read_golden(store, model_name, int(done))
        except RefitError:
            golden = None
        if golden is not None and golden.fingerprint == tags.get("refit.golden_after_fingerprint"):
            return golden
    golden = grow_suite(store, model_name, fresh, max_per_label)
    versions.set_tags(model_name, version, golden.tags("refit.golden_after"))
    return golden


def promote_with_golden(store: ObjectStore, model_name: str, version: int, expected_champion: int | None,
                        fresh: pd.DataFrame, max_per_label: int, holder: str):
    """Promote an update under the model's promotion lock, its fresh holdout joining the golden suite first.

    The suite grows as part of the promotion: once the move is known to be
    allowed (``versions.check_promotion``), before the alias moves, and
    recorded on the version. So a stop anywhere never leaves a champion
    whose fresh set is missing from the suite, and the suite grows from the
    newest version under the lock, not from the one the update was judged
    on, so a fresh set that joined meanwhile is never dropped. A stop between
    the two leaves a suite version holding rows of an update that was not
    promoted: still held-out production labels, never trained on. Returns
    the suite after. Safe to retry as a whole.
    """
    with versions.promotion_lock(store, model_name, holder) as lease:
        faults.point("update.before_promote")
        versions.check_promotion(model_name, version, expected_champion, lease)
        grown_to = golden_after_promotion(store, model_name, version, fresh, max_per_label)
        faults.point("update.golden_written")
        promote_now(model_name, version, expected_champion, lease=lease)
        faults.point("update.after_promote")
    return grown_to


promote_update = task(name="promote-update", cache_policy=NO_CACHE, **RETRY)(promote_with_golden)


def notify_server(settings: Settings | None = None, timeout: float = 60.0) -> str:
    """Ask the running server to load the champion now; says what happened, never raises.

    The server answers once the new version is loaded and its canary (or
    direct swap) has started.
    """
    settings = settings or Settings()
    if not settings.serve_url:
        return "not told (no REFIT_SERVE_URL); it will see the alias at its next poll"
    if settings.serve_admin_token is None:
        return "not told (no REFIT_SERVE_ADMIN_TOKEN); it will see the alias at its next poll"
    request = urllib.request.Request(
        settings.serve_url.rstrip("/") + "/admin/reload", data=b"{}", method="POST",
        headers={"Authorization": f"Bearer {settings.serve_admin_token.get_secret_value()}",
                 "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status = json.loads(answer.read())
        return f"serving v{status.get('loaded')} ({status.get('adopted')})"
    except urllib.error.HTTPError as exc:
        return f"refused the reload: HTTP {exc.code} {exc.read()[:200]!r}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"not reached at {settings.serve_url} ({exc}); it will see the alias at its next poll"


def _log(message: str) -> None:
    import logging

    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().info(message)
    except MissingContextError:
        logging.getLogger(__name__).info(message)


def ship(ctx, start, labelled, learnable, ladder, run_id: str, drift_run_id: str | None, reason: str | None,
         meters) -> int:
    """Register the final rung's version; on a pass write its reference and cascade, then promote it.

    One Prefect transaction: a failure after registering rolls back (the
    version is tagged abandoned). A promoted update writes which labels it
    used and closes its drift episode; a refused one records the try on the
    episode, which stays open and tries again once more labels arrived.
    Returns the registered version.
    """
    from prefect.transactions import transaction

    from registry import episodes
    from tasks.cascade import cascade
    from tasks.labels import record_used

    name, data, final = ctx.model_name, learnable.data, ladder.final
    with transaction():
        with meters.stage("register"):
            version = register_version(name, final.run_id, update_version_tags(
                kind=start.kind, reason=reason, champion=start.champion, run_id=run_id, recipe=final.recipe.name,
                attempts=len(ladder.attempts), source=labelled.source, training=data.training, data=data,
                golden=start.golden, drift_run_id=drift_run_id, rules_path=start.rules_path, verdict=final.verdict,
                cost_usd=ladder.train_cost_usd, cpu_seconds=ladder.train_cpu_seconds, after=final.after,
                adapter_dir=final.trained.adapter_dir))
            faults.point("update.after_register")
        if not final.verdict.passed:
            if labelled.episode is not None:
                episodes.record_try(labelled.episode.id, labelled.usable)
            return version
        with meters.stage("reference"):
            _write_update_reference(ctx, start, data, ladder, version)
        with meters.stage("cascade"):  # the cheap tier, gated as a unit, before the server is told
            cascade(name, version, final.trained.adapter_dir, start.pool, labelled.rows["text"].tolist(), data.sets,
                    ctx.rates, ctx.experiment_id, store=ctx.store, evaluation=final.after)
        with meters.stage("deploy"):  # under the lock: the fresh holdout joins the golden suite, the alias moves
            promote_update(ctx.store, name, version, start.champion, data.fresh, start.policy.golden_max_per_label,
                           f"{start.kind} run {run_id}")
            if labelled.episode is not None:  # its labels are used now; later ones wait for the next episode
                record_used(ctx.store, name, run_id, learnable.admitted.rows, data.fresh["text"])
                episodes.close(labelled.episode.id, f"v{version} promoted, trained on its labels (update run "
                                                    f"{run_id})", f"v{version}")
    return version


def _write_update_reference(ctx, start, data, ladder, version: int) -> None:
    """The new version's drift reference: its replay pool with the update's new rows, judged on held-out text."""
    training, final = data.training, ladder.final
    reference_uri = write_reference(
        ctx.store, ctx.model_name, version, modeling.load_model(final.trained.adapter_dir), ladder.tokenizer,
        pool=pd.concat([start.pool, training.frame[training.frame.origin == "new"]]),
        trained_on=ladder.trained_on, seed=ctx.settings.seed,
        held_out=pd.concat([start.golden.frame[["text", "label"]], data.fresh[["text", "label"]]]),
        answers=final.after.answers)
    versions.set_tags(ctx.model_name, version, {"refit.reference_uri": reference_uri})
