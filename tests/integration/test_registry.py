"""The registry against a real MLflow store (SQLite in tmp_path), with local or S3 artifacts."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from refit.errors import RefitError
from refit.settings import Settings
from refit.store import S3Store
from registry import tracking, versions
from tasks import budget

MODEL = "intent-classifier-test"


def _month_start_ms() -> int:
    now = datetime.now(timezone.utc)
    return int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)


def _run_with_adapter(experiment_id: str, tmp_path: Path, content: str) -> str:
    """A finished run whose artifacts hold ``adapter/`` with two small files."""
    adapter = tmp_path / f"adapter-src-{uuid.uuid4().hex[:6]}"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_text(content)
    (adapter / "labels.json").write_text('["a", "b"]')
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_artifacts(str(adapter), versions.ADAPTER_DIR)
        mlflow.log_artifact(str(adapter / "labels.json"), "elsewhere")
    return run.info.run_id


def _exercise_registry(experiment_id: str, tmp_path: Path) -> list[str]:
    """Register, alias, promote (guarded), tag and download; returns the versions' sources."""
    assert versions.alias_version(MODEL, versions.CHAMPION) is None  # no such model yet

    run1 = _run_with_adapter(experiment_id, tmp_path, "weights-1")
    v1 = versions.register(MODEL, run1, {"refit.kind": "bootstrap", "refit.cost": 0.25})
    assert v1 == 1
    assert versions.version_tags(MODEL, v1) == {"refit.kind": "bootstrap", "refit.cost": "0.25"}
    assert versions.alias_version(MODEL, versions.CHAMPION) is None

    assert versions.promote(MODEL, v1, expected_champion=None) is None
    assert versions.alias_version(MODEL, versions.CHAMPION) == 1
    assert versions.alias_version(MODEL, versions.PREVIOUS) is None

    run2 = _run_with_adapter(experiment_id, tmp_path, "weights-2")
    v2 = versions.register(MODEL, run2, {"refit.parent_version": str(v1)})
    assert v2 == 2
    versions.set_alias(MODEL, versions.CHALLENGER, v2)
    assert versions.alias_version(MODEL, versions.CHALLENGER) == 2

    # The champion moved since the gate looked: the stale promotion is refused and changes nothing.
    for stale in (None, 2, 7):
        with pytest.raises(versions.PromotionConflict) as info:
            versions.promote(MODEL, v2, expected_champion=stale)
        assert "v1" in str(info.value)
        assert versions.alias_version(MODEL, versions.CHAMPION) == 1
        assert versions.alias_version(MODEL, versions.PREVIOUS) is None

    assert versions.promote(MODEL, v2, expected_champion=1) == 1
    assert versions.alias_version(MODEL, versions.CHAMPION) == 2
    assert versions.alias_version(MODEL, versions.PREVIOUS) == 1

    versions.set_tags(MODEL, v2, {"refit.deployed": "champion", "refit.long": "x" * 6000})
    tags = versions.version_tags(MODEL, v2)
    assert tags["refit.deployed"] == "champion"
    assert tags["refit.parent_version"] == "1"
    assert len(tags["refit.long"]) == 5000  # truncated to what MLflow stores
    assert "refit.deployed" not in versions.version_tags(MODEL, v1)

    for version, content in ((v1, "weights-1"), (v2, "weights-2")):
        local = versions.download_adapter(MODEL, version)
        assert sorted(p.name for p in local.iterdir()) == ["adapter_model.safetensors", "labels.json"]
        assert (local / "adapter_model.safetensors").read_text() == content

    client = MlflowClient()
    return [client.get_model_version(MODEL, str(v)).source for v in (v1, v2)]


def test_registry_on_sqlite_with_local_artifacts(tmp_path):
    settings = Settings(home=tmp_path / "home")
    experiment_id = tracking.configure(settings)
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert (tmp_path / "home" / "mlflow.db").is_file()
    experiment = MlflowClient().get_experiment(experiment_id)
    assert experiment.artifact_location == settings.artifact_location
    assert tracking.configure(settings) == experiment_id  # idempotent

    sources = _exercise_registry(experiment_id, tmp_path)
    for source in sources:
        assert source.startswith((tmp_path / "home" / "mlflow-artifacts").as_uri())
        assert source.endswith("/adapter")


def test_registry_with_s3_artifacts(tmp_path, s3_endpoint, monkeypatch):
    # configure() exports MLFLOW_S3_ENDPOINT_URL; register it with monkeypatch so it is undone.
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://unset.invalid")
    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    S3Store(bucket=bucket, endpoint_url=s3_endpoint).ensure_bucket()
    settings = Settings(store="s3", s3_bucket=bucket, s3_endpoint_url=s3_endpoint, home=tmp_path / "home")
    experiment_id = tracking.configure(settings)
    import os

    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == s3_endpoint
    assert MlflowClient().get_experiment(experiment_id).artifact_location == f"s3://{bucket}/mlflow-artifacts"

    sources = _exercise_registry(experiment_id, tmp_path)
    for source in sources:
        assert source.startswith(f"s3://{bucket}/mlflow-artifacts/")
        assert source.endswith("/adapter")
    keys = S3Store(bucket=bucket, endpoint_url=s3_endpoint).list("mlflow-artifacts/")
    assert sum(k.endswith("/adapter/adapter_model.safetensors") for k in keys) == 2


def test_month_spend_sums_this_months_updates_of_one_model(tmp_path):
    experiment_id = tracking.configure(Settings(home=tmp_path / "home"))
    client = MlflowClient()

    def run(tags: dict[str, str], cost: float | None, start_ms: int | None = None) -> None:
        created = client.create_run(experiment_id, start_time=start_ms, tags=tags)
        if cost is not None:
            client.log_metric(created.info.run_id, "update_cost_usd", cost)
        client.set_terminated(created.info.run_id)

    update = {tracking.RUN_TYPE: "update", "refit.model": MODEL}
    assert budget.month_spend(experiment_id, MODEL, _month_start_ms()) == 0.0
    run(update, 0.125)
    run(update, 0.25)
    run(update, None)  # refused before any metric was logged
    run(update | {"refit.model": "some-other-model"}, 10.0)
    run({tracking.RUN_TYPE: "drift-check", "refit.model": MODEL}, 5.0)
    run({"refit.model": MODEL}, 7.0)  # not tagged as an update at all
    last_month = _month_start_ms() - int(timedelta(days=3).total_seconds() * 1000)
    run(update, 100.0, start_ms=last_month)

    assert budget.month_spend(experiment_id, MODEL, _month_start_ms()) == pytest.approx(0.375)
    assert budget.month_spend(experiment_id, "some-other-model", _month_start_ms()) == pytest.approx(10.0)
    assert budget.month_spend(experiment_id, MODEL, last_month) == pytest.approx(100.375)


def test_runs_a_killed_update_left_running_are_closed_and_charged_their_estimate(tmp_path):
    experiment_id = tracking.configure(Settings(home=tmp_path / "home"))
    client = MlflowClient()

    def run(tags: dict[str, str], metrics: dict[str, float], finished: bool) -> str:
        created = client.create_run(experiment_id, tags=tags)
        for key, value in metrics.items():
            client.log_metric(created.info.run_id, key, value)
        if finished:
            client.set_terminated(created.info.run_id)
        return created.info.run_id

    update = {tracking.RUN_TYPE: "update", "refit.model": MODEL}
    attempt = {tracking.RUN_TYPE: "update-attempt", "refit.model": MODEL}
    killed = run(update | {"refit.flow_run_id": "crashed-1"}, {"estimate_cost_usd": 0.002}, finished=False)
    finished_attempt = run(attempt | {"refit.flow_run_id": "crashed-1", "mlflow.parentRunId": killed},
                           {"update_cost_usd": 0.001}, finished=True)
    killed_attempt = run(attempt | {"refit.flow_run_id": "crashed-1", "mlflow.parentRunId": killed}, {},
                         finished=False)
    live = run(update | {"refit.flow_run_id": "running-2"}, {"estimate_cost_usd": 0.5}, finished=False)
    untagged = run(update, {"estimate_cost_usd": 0.5}, finished=False)  # an embedded run, say
    done = run(update | {"refit.flow_run_id": "completed-3"}, {"estimate_cost_usd": 0.002, "update_cost_usd": 0.003},
               finished=True)
    other_model = run(update | {"refit.model": "other", "refit.flow_run_id": "crashed-4"}, {}, finished=False)
    monitor = run({tracking.RUN_TYPE: "drift-check", "refit.model": MODEL, "refit.flow_run_id": "crashed-5"}, {},
                  finished=False)

    def ended(flow_run_id: str) -> bool:  # what the Prefect server would answer
        return not flow_run_id.startswith("running")

    closed = tracking.close_abandoned_updates(experiment_id, MODEL, "flow run test", ended)
    assert sorted(closed) == sorted([killed, killed_attempt])
    for run_id in closed:
        got = client.get_run(run_id)
        assert got.info.status == "KILLED" and "closed by flow run test" in got.data.tags["refit.abandoned"]
    # Charged what its finished attempt cost plus the estimate for the attempt cut short.
    assert client.get_run(killed).data.metrics["update_cost_usd"] == pytest.approx(0.003)
    assert "update_cost_usd" not in client.get_run(killed_attempt).data.metrics
    statuses = [client.get_run(r).info.status for r in (finished_attempt, live, untagged, done, other_model, monitor)]
    assert statuses == ["FINISHED", "RUNNING", "RUNNING", "FINISHED", "RUNNING", "RUNNING"]
    assert budget.month_spend(experiment_id, MODEL, _month_start_ms()) == pytest.approx(0.006)
    assert tracking.close_abandoned_updates(experiment_id, MODEL, "again", ended) == []


def _champion_2_previous_1(tmp_path) -> str:
    """A fresh registry: v1 then v2 promoted (champion 2, previous 1), and v3 registered. Returns the experiment."""
    experiment_id = tracking.configure(Settings(home=tmp_path / "home"))
    for i in (1, 2, 3):
        versions.register(MODEL, _run_with_adapter(experiment_id, tmp_path, f"weights-{i}"), {})
    versions.promote(MODEL, 1, expected_champion=None)
    versions.promote(MODEL, 2, expected_champion=1)
    return experiment_id


def test_a_stale_lease_cannot_write_the_aliases(tmp_path):
    """The fencing token is checked at the alias write: a holder whose lock was broken (a paused process),
    or one whose number is below what a later holder already wrote, writes nothing."""
    from refit.store import LocalStore

    _champion_2_previous_1(tmp_path)
    store = LocalStore(tmp_path / "store")
    with versions.promotion_lock(store, MODEL, "paused holder") as stale:
        store.delete(versions.lock_key(MODEL))  # broken by a waiter while this holder was paused
        with versions.promotion_lock(store, MODEL, "new holder", wait_seconds=1):
            pass
        with pytest.raises(versions.PromotionConflict, match="lost the promotion lock"):
            versions.promote(MODEL, 3, expected_champion=2, lease=stale)
    assert versions.alias_version(MODEL, versions.CHAMPION) == 2

    with versions.promotion_lock(store, MODEL, "late holder") as late:
        # The store keeps the highest number that wrote the aliases; a later one got there between our check and write.
        store.put_bytes(versions.fence_mark_key(MODEL), str(late.number + 5).encode())
        with pytest.raises(versions.PromotionConflict, match="stale"):
            versions.promote(MODEL, 3, expected_champion=2, lease=late)
    assert versions.alias_version(MODEL, versions.CHAMPION) == 2

    with versions.promotion_lock(store, MODEL, "next holder") as lease:  # its number is above the mark
        assert lease.number == late.number + 6
        assert versions.promote(MODEL, 3, expected_champion=2, lease=lease) == 2
    assert versions.alias_version(MODEL, versions.CHAMPION) == 3
    assert versions.read_fence_mark(store, MODEL)[0] == lease.number


def test_rollback_clears_previous_before_it_releases_the_lock(tmp_path):
    """Before, ``previous`` was cleared after the lock was released: a promotion in between lost its
    ``previous`` to the rollback's late delete. The store here is the real local store, watched at release."""
    from refit.store import LocalStore
    from registry.rollout import roll_back

    experiment_id = _champion_2_previous_1(tmp_path)
    at_release = []

    class Watched(LocalStore):
        def _released(self, key: str) -> None:
            if key == versions.lock_key(MODEL):
                at_release.append((versions.alias_version(MODEL, versions.CHAMPION),
                                   versions.alias_version(MODEL, versions.PREVIOUS)))

        def delete_if(self, key: str, tag: str) -> bool:
            self._released(key)
            return super().delete_if(key, tag)

        def delete(self, key: str) -> None:  # (how the code before released it)
            self._released(key)
            super().delete(key)

    result = roll_back(MODEL, 2, "bad", experiment_id=experiment_id, store=Watched(tmp_path / "store"))
    assert (result["champion"], result["rolled_back"]) == (1, 2)
    assert at_release == [(1, None)]


def test_a_rollback_whose_record_fails_closes_its_run_and_a_retry_records_it_once(tmp_path):
    """The rollback run is closed in a finally (before, a failure left it RUNNING); the server's retry, told
    where it went back to, finds the aliases already moved and writes the record that is missing, once."""
    from registry.rollout import roll_back

    experiment_id = _champion_2_previous_1(tmp_path)
    with pytest.raises(ValueError):
        roll_back(MODEL, 2, "bad", experiment_id=experiment_id, guard_json={"new": {"latency": "not a number"}})
    client = MlflowClient()
    runs = client.search_runs([experiment_id], "tags.`refit.run_type` = 'rollback'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert versions.alias_version(MODEL, versions.CHAMPION) == 1
    assert versions.alias_version(MODEL, versions.PREVIOUS) is None

    first = roll_back(MODEL, 2, "bad", experiment_id=experiment_id, restore_to=1)
    again = roll_back(MODEL, 2, "bad", experiment_id=experiment_id, restore_to=1)
    assert first["run_id"] == again["run_id"] == versions.version_tags(MODEL, 2)["refit.rollback_run_id"]
    runs = client.search_runs([experiment_id], "tags.`refit.run_type` = 'rollback'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    with pytest.raises(versions.PromotionConflict):  # without being told, a moved champion is someone else's doing
        roll_back(MODEL, 2, "bad", experiment_id=experiment_id)


def test_a_promotion_stopped_after_moving_the_alias_is_recorded_by_the_next_update(tmp_path):
    """Fault `update.kill.promote` of `refit bench faults`: the alias moved, the deployed tag was never written."""
    experiment_id = tracking.configure(Settings(home=tmp_path / "home"))
    v1 = versions.register(MODEL, _run_with_adapter(experiment_id, tmp_path, "w1"), {"refit.deployed": "champion"})
    versions.promote(MODEL, v1, expected_champion=None)
    v2 = versions.register(MODEL, _run_with_adapter(experiment_id, tmp_path, "w2"), {})
    versions.promote(MODEL, v2, expected_champion=v1)  # ... and killed here, before tasks.deploy.promote tags it
    v3 = versions.register(MODEL, _run_with_adapter(experiment_id, tmp_path, "w3"), {})
    versions.set_tags(MODEL, v3, {"refit.deployed": "abandoned: the steps after registration failed"})
    versions.promote(MODEL, v3, expected_champion=v2)  # the alias moved, then a later step failed

    assert versions.repair_deployed_tags(MODEL) == [v3, v2]
    for version in (v1, v2, v3):
        assert versions.version_tags(MODEL, version)["refit.deployed"] == "champion"
    assert "untagged" in versions.version_tags(MODEL, v2)["refit.deployed_repaired"]
    versions.set_tags(MODEL, v2, {"refit.deployed": "rolled back"})
    assert versions.repair_deployed_tags(MODEL) == []  # a rolled-back version keeps its record


@pytest.mark.parametrize("stopped_at", ["champion_moved", "aliases_moved"])
def test_a_rollback_stopped_after_moving_the_aliases_is_finished_by_the_next_rollback(tmp_path, stopped_at):
    """Faults `rollback.kill.champion_moved/aliases_moved` of `refit bench faults`: before, the record was lost and
    a second rollback refused ("no previous champion"), so nobody could finish it."""
    from registry import rollout

    experiment_id = _champion_2_previous_1(tmp_path)
    if stopped_at == "aliases_moved":
        assert rollout._move_aliases_back(MODEL, None, None, None, "guard: errors", "server") == (2, 1)
    else:  # the journal is written, champion moved back, killed before previous was cleared
        versions.set_tags(MODEL, 2, {rollout.INTENT_TAG: json.dumps(
            {"restore_to": 1, "reason": "guard: errors", "source": "server"})})
        versions.set_alias(MODEL, versions.CHAMPION, 1)
    assert "refit.rollback_run_id" not in versions.version_tags(MODEL, 2)

    result = rollout.roll_back(MODEL, None, "operator: finish it", experiment_id=experiment_id)

    assert (result["champion"], result["rolled_back"], result["reason"]) == (1, 2, "guard: errors")
    assert versions.alias_version(MODEL, versions.CHAMPION) == 1
    assert versions.alias_version(MODEL, versions.PREVIOUS) is None
    tags = versions.version_tags(MODEL, 2)
    assert tags["refit.deployed"] == "rolled back" and tags["refit.rollback_run_id"] == result["run_id"]
    run = MlflowClient().get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["refit.rolled_back_by"] == "server"
    with pytest.raises(RefitError):  # finished: a further rollback has nowhere to go
        rollout.roll_back(MODEL, None, "again", experiment_id=experiment_id)


def test_a_rollback_killed_with_its_run_open_has_the_run_closed_by_the_next(tmp_path):
    """Fault `rollback.kill.run_created`: the run stayed RUNNING for good."""
    import subprocess
    import sys

    from refit import processes
    from registry import rollout

    experiment_id = _champion_2_previous_1(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = processes.identity(child.pid)
    child.kill()
    child.wait()
    client = MlflowClient()
    left = client.create_run(experiment_id, tags={tracking.RUN_TYPE: "rollback", "refit.model": MODEL,
                                                  "refit.process": dead}).info.run_id
    alive = client.create_run(experiment_id, tags={tracking.RUN_TYPE: "rollback", "refit.model": MODEL,
                                                   "refit.process": processes.identity()}).info.run_id

    rollout.roll_back(MODEL, None, "again", experiment_id=experiment_id)

    assert client.get_run(left).info.status == "KILLED"
    assert "killed" in client.get_run(left).data.tags["refit.abandoned"]
    assert client.get_run(alive).info.status == "RUNNING"  # its process still runs: not ours to close
