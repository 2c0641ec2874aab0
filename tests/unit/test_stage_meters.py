"""Stage meters count the process, its threads and its children; the ledger's stages add up to its updates."""

from __future__ import annotations

import subprocess
import sys
import threading
from types import SimpleNamespace

from refit.cost import Rates, StageMeters
from tasks.budget import grown_stages, spend_by_stage


def _spin(seconds: float) -> None:
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_stage_pays_for_its_threads_and_children():
    meters = StageMeters()
    with meters.stage("threads"):
        worker = threading.Thread(target=sum, args=(range(4_000_000),))
        worker.start()
        worker.join()
    with meters.stage("child"):
        subprocess.run([sys.executable, "-c", "sum(i * i for i in range(6_000_000))"], check=True)
    with meters.stage("threads"):  # a stage run twice adds up
        pass
    assert meters.cpu["threads"] > 0.02
    assert meters.cpu["child"] > 0.1  # the child's CPU, which time.process_time() would miss
    assert meters.whole() >= meters.cpu["threads"] + meters.cpu["child"] - 0.01
    metrics = meters.metrics(Rates(cpu_usd_per_hour=3.6, gpu_usd_per_hour=0.0))
    assert metrics["stage_cost_usd.child"] == round(meters.cpu["child"] / 1000, 8)


def _run(cost: float, **stages: float):
    metrics = {"update_cost_usd": cost} | {f"stage_cost_usd.{k}": v for k, v in stages.items()}
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics))


def test_spend_by_stage_adds_up_to_the_ledger_and_flags_growth():
    runs = [_run(0.010, train=0.002, cascade=0.006), _run(0.005, train=0.001, cascade=0.003)]
    by_stage = spend_by_stage(runs)
    assert abs(sum(by_stage.values()) - 0.015) < 1e-9
    assert by_stage == {"cascade": 0.009, "other": 0.003, "train": 0.003}
    last = [_run(0.004, train=0.0015, cascade=0.002)]
    assert grown_stages(runs, last) == ["cascade"]  # 0.0045 an update against 0.002; training 0.0015 both months
    assert grown_stages(runs, []) == []
