"""Tasks inside real Prefect flows (a temporary local Prefect API): the engine path of the stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from prefect import flow

from flows.common import user_error
from refit.cost import Rates
from refit.errors import RefitError
from refit.store import LocalStore
from tasks.finetune import Recipe, fine_tune
from tasks.validate import validate_window


@flow(name="test-validate")
def validate_flow(root: str, rows: list[dict], min_rows: int):
    try:
        return validate_window(LocalStore(root), "m", pd.DataFrame(rows), min_rows)
    except RefitError as exc:
        return user_error(exc)


@flow(name="test-fine-tune")
def fine_tune_flow(rows: list[dict], labels: list[str]):
    trained = fine_tune(pd.DataFrame(rows), Recipe(rank=2, alpha=4, epochs=1, learning_rate=1e-3, batch_size=4),
                        Rates(0.048, 2.5), labels=labels)
    return {"steps": trained.steps, "examples": trained.cost.examples_seen, "dir": str(trained.adapter_dir)}


def test_validate_task_in_a_flow(prefect_harness, tmp_path):
    rows = [{"request_id": "a", "text": "hello"}, {"request_id": "b", "text": " "}]
    result = validate_flow(str(tmp_path / "store"), rows, 1)
    assert result.rows_in == 2 and result.rows_quarantined == 1
    assert LocalStore(tmp_path / "store").list("quarantine/model=m/")


def test_user_error_ends_the_flow_failed_with_one_line(prefect_harness, tmp_path):
    state = validate_flow(str(tmp_path / "store"), [], 1, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("window is empty")
    state = validate_flow(str(tmp_path / "store"), [{"request_id": "a", "text": ""}], 1, return_state=True)
    assert state.is_failed() and state.message.startswith("window rejected: 0 usable rows of 1")


def test_fine_tune_task_in_a_flow(prefect_harness):
    import torch

    torch.set_num_threads(1)
    rows = [{"text": t, "label": label} for t, label in
            [("hello", "hi"), ("hey there", "hi"), ("is it raining", "weather"), ("sunny today", "weather")]]
    result = fine_tune_flow(rows, ["hi", "weather"])
    adapter_dir = Path(result["dir"])
    try:
        assert result["steps"] == 1 and result["examples"] == 4
        assert (adapter_dir / "adapter_model.safetensors").is_file()
        assert json.loads((adapter_dir / "labels.json").read_text()) == ["hi", "weather"]
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)


@flow(name="test-one-at-a-time")
def guarded_flow(name: str, log_path: str, slot: str = "refit-update-test-model", hold: float = 2) -> None:
    import time

    from flows.common import one_at_a_time

    with one_at_a_time(slot, timeout_seconds=120):
        with open(log_path, "a") as fh:
            fh.write(f"enter {name} {time.time()}\n")
        time.sleep(hold)
        with open(log_path, "a") as fh:
            fh.write(f"leave {name} {time.time()}\n")


def test_updates_of_one_model_run_one_at_a_time(prefect_harness, tmp_path):
    """Two update-like flows started together: the per-model concurrency limit serialises them."""
    import threading

    log = tmp_path / "log.txt"
    threads = [threading.Thread(target=guarded_flow, args=(name, str(log))) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["enter", "leave", "enter", "leave"], events
    assert events[0][1] == events[1][1] and events[2][1] == events[3][1]  # each left before the other entered
    assert {events[0][1], events[2][1]} == {"a", "b"}


def test_two_models_do_not_wait_for_each_other(prefect_harness, tmp_path):
    """Each model has its own slot (refit-monitor-<model>, ...): checks of two models run at the same time."""
    import threading

    log = tmp_path / "log.txt"
    # Each holds its slot 10 s: far longer than the 1-2 s a flow run takes to start in a thread here.
    threads = [threading.Thread(target=guarded_flow, args=(name, str(log), f"refit-monitor-{name}", 10))
               for name in ("model-a", "model-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["enter", "enter", "leave", "leave"], events  # both in before either left


CALLS: list[str] = []


def _flaky(kind: str) -> str:
    CALLS.append(kind)
    if len(CALLS) == 1:
        if kind == "network":
            raise ConnectionError("connection refused by 127.0.0.1:9000")
        raise RefitError("a user mistake: retrying would repeat it")
    return "ok"


def test_transient_errors_are_retried_and_user_errors_are_not(prefect_harness):
    from prefect import task

    from tasks.retry import RETRY

    flaky = task(name="flaky", **RETRY)(_flaky)

    @flow(name="test-retry")
    def retry_flow(kind: str):
        return flaky(kind)

    CALLS.clear()
    assert retry_flow("network") == "ok" and CALLS == ["network", "network"]
    CALLS.clear()
    state = retry_flow("user", return_state=True)
    assert state.is_failed() and CALLS == ["user"]


def test_what_counts_as_transient():
    from botocore.exceptions import ClientError, EndpointConnectionError
    from mlflow.exceptions import MlflowException

    from tasks.retry import is_transient

    def s3(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:9000"))
    assert is_transient(s3("SlowDown")) and is_transient(s3("503"))
    assert not is_transient(s3("NoSuchKey")) and not is_transient(s3("AccessDenied"))
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_transient(MlflowException("(sqlite3.OperationalError) database is locked"))
    assert not is_transient(MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(RefitError("bad input")) and not is_transient(ValueError("bug"))


def test_failure_after_registering_rolls_back_to_a_tagged_version(prefect_harness, tmp_path, monkeypatch):
    """register -> (promotion fails) inside a Prefect transaction: the version is tagged abandoned, champion unmoved."""
    import mlflow
    from prefect.transactions import transaction

    from registry import versions
    from tasks.deploy import register_version

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("txn", artifact_location=(tmp_path / "artifacts").as_uri())
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "labels.json").write_text('["a"]')
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(adapter), versions.ADAPTER_DIR)

    @flow(name="test-register-then-fail")
    def register_then_fail(run_id: str, fail: bool):
        with transaction():
            version = register_version("txn-model", run_id, {"refit.kind": "update"})
            if fail:
                raise RefitError("champion moved: promotion refused")
        return version

    state = register_then_fail(run.info.run_id, True, return_state=True)
    assert state.is_failed() and "promotion refused" in state.message
    tags = versions.version_tags("txn-model", 1)
    assert tags["refit.deployed"].startswith("abandoned") and tags["refit.kind"] == "update"
    assert versions.alias_version("txn-model", versions.CHAMPION) is None

    assert register_then_fail(run.info.run_id, False) == 2  # committed: no rollback tag
    assert "refit.deployed" not in versions.version_tags("txn-model", 2)
    mlflow.set_tracking_uri(None)


def test_a_slot_held_too_long_is_a_clear_error(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate

    from flows.common import one_at_a_time

    name = "refit-update-leaked"
    with get_client(sync_client=True) as client:  # a slot taken by a run that died with its lease forgotten
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=1))

    @flow(name="test-leaked-slot")
    def wants_the_slot():
        try:
            with one_at_a_time(name, timeout_seconds=2):
                return "ran"
        except RefitError as exc:
            return user_error(exc)

    state = wants_the_slot(return_state=True)
    assert state.is_failed() and f"prefect gcl update {name} --active-slots 0" in state.message
