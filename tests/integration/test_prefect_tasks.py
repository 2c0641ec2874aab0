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
def guarded_flow(name: str, log_path: str) -> None:
    import time

    from flows.common import one_at_a_time

    with one_at_a_time("refit-update-test-model", timeout_seconds=120):
        with open(log_path, "a") as fh:
            fh.write(f"enter {name} {time.time()}\n")
        time.sleep(2)
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
