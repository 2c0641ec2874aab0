"""Promotion reaches the running server: hot swap under load, canary, shadow, automatic and manual rollback."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import httpx
import pytest
from mlflow import MlflowClient

from refit.store import LocalStore
from registry import versions
from tasks.deploy import promote
from tests.serving.conftest import TOKEN, unique_texts, write_policy


class Traffic:
    """Eight client threads sending 1-6 texts per request until stopped; every answer is kept."""

    def __init__(self, url: str, texts: list[str], threads: int = 8):
        self.url, self.texts = url, texts
        self.answers: list[tuple[float, int, dict | str, int]] = []  # (time sent, status, body, texts sent)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                texts = unique_texts(rng.sample(self.texts, 6), rng.randint(1, 6))
                sent = time.monotonic()
                answer = client.post(self.url + "/predict", json={"texts": texts})
                body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else answer.text
                with self._lock:
                    self.answers.append((sent, answer.status_code, body, len(texts)))

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def statuses(self) -> Counter:
        return Counter(status for _, status, _, _ in self.answers)

    def versions_after(self, moment: float) -> Counter:
        """Answering versions of the requests sent after ``moment``."""
        return Counter(body["model_version"] for at, status, body, _ in self.answers if at > moment and status == 200)

    @property
    def rows(self) -> int:
        return sum(n for _, status, _, n in self.answers if status == 200)


def _wait_for(condition, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout:.0f}s")


def _logged_rows(settings) -> int:
    return len(LocalStore(settings.local_store_root).read_parquet_prefix(f"inference/model={settings.model_name}/"))


def test_hot_swap_under_load_drops_no_request(registry, start_server, serving_env, tmp_path):
    server = start_server(write_policy(tmp_path / "direct.yaml", mode="direct"))
    v2 = registry.register("good")
    with Traffic(server.url, registry.adapters.texts) as traffic:
        _wait_for(lambda: len(traffic.answers) >= 40, 60, "40 answers from v1")
        promote.fn(registry.name, v2, 1)  # the deploy step: moves the alias and tells the server
        swapped = time.monotonic()
        _wait_for(lambda: traffic.versions_after(swapped).get(2, 0) >= 40, 60, "40 answers from v2")
    assert traffic.statuses() == Counter({200: len(traffic.answers)})
    assert set(traffic.versions_after(0)) == {1, 2}
    # The reload answers once v2 serves, and each request is routed when it arrives: every request sent after
    # the promotion returned is v2's, with no margin of time (the swap is complete, not a mix).
    assert set(traffic.versions_after(swapped)) == {2}
    assert server.state.rollout.status()["phase"] == "stable"
    server.stop()
    assert _logged_rows(serving_env) == traffic.rows  # nothing lost across the swap and the stop


@pytest.mark.parametrize("mode", ["canary", "shadow"])
def test_bad_version_is_rolled_back_on_its_own(registry, start_server, tmp_path, mode):
    policy = write_policy(tmp_path / f"{mode}.yaml", mode=mode, canary_share=0.5, window_seconds=60)
    server = start_server(policy)
    bad = registry.register("bad")  # untrained head: far less confident than v1
    with Traffic(server.url, registry.adapters.texts) as traffic:
        _wait_for(lambda: len(traffic.answers) >= 20, 60, "20 answers from v1")
        promoted = time.monotonic()
        promote.fn(registry.name, bad, 1)
        assert registry.champion() == bad
        seconds = _wait_for(lambda: registry.champion() == 1, 60, "rollback to v1 in MLflow")
        settled = time.monotonic()
        _wait_for(lambda: traffic.versions_after(settled).get(1, 0) >= 20, 60, "20 more answers")
    assert seconds < 60
    assert traffic.statuses() == Counter({200: len(traffic.answers)})
    answered_by_bad = traffic.versions_after(promoted).get(bad, 0)
    assert answered_by_bad > 0 if mode == "canary" else answered_by_bad == 0  # shadow never answers
    assert set(traffic.versions_after(settled)) == {1}

    status = server.state.rollout.status()
    assert (status["phase"], status["champion"], status["refused"]) == ("stable", 1, [bad])
    tags = versions.version_tags(registry.name, bad)
    assert tags["refit.deployed"] == "rolled back"
    assert "confidence_ratio failed" in tags["refit.rolled_back"] and mode in tags["refit.rolled_back"]
    assert versions.alias_version(registry.name, versions.PREVIOUS) is None  # never return to the bad one
    client = MlflowClient()
    run = client.get_run(tags["refit.rollback_run_id"])
    assert run.data.tags["refit.rolled_back_version"] == str(bad) and run.data.tags["refit.restored_version"] == "1"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"guard.html", "guard.md", "guard.json"}
    guard_table = (client.download_artifacts(run.info.run_id, "guard.html", str(tmp_path)))
    html = open(guard_table).read()
    assert "confidence_ratio" in html and "FAIL" in html
    assert run.data.metrics["new_mean_confidence"] < 0.8 * run.data.metrics["old_mean_confidence"]
    assert 'refit_rollbacks_total 1.0' in httpx.get(server.url + "/metrics").text

    # Should the alias point at the refused version again (a stale writer), the server does not take it back.
    versions.set_alias(registry.name, versions.CHAMPION, bad)
    reload = httpx.post(server.url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert reload.json()["adopted"] == f"v{bad} was rolled back here"
    assert server.state.rollout.serving_version == 1


def test_good_version_passes_the_canary_and_takes_all_traffic(registry, start_server, tmp_path):
    # v2 is v1's very model: a guard can only fail it on noise, and the mean confidence of ten requests (1-6
    # texts each) can differ by a quarter between two windows of one model. The guards stay on, with that room.
    policy = write_policy(tmp_path / "canary.yaml", mode="canary", canary_share=0.5, window_seconds=3,
                          watch_seconds=2, guards={"max_latency_p95_ratio": 10.0, "max_cost_per_1k_ratio": 10.0,
                                                   "min_confidence_ratio": 0.5})
    server = start_server(policy)
    v2 = registry.register("good")
    with Traffic(server.url, registry.adapters.texts) as traffic:
        _wait_for(lambda: len(traffic.answers) >= 20, 60, "20 answers from v1")
        promote.fn(registry.name, v2, 1)
        promoted = time.monotonic()
        _wait_for(lambda: server.state.rollout.status()["phase"] == "watch", 60, "canary passed")
        mixed = traffic.versions_after(promoted)
        _wait_for(lambda: server.state.rollout.status()["phase"] == "stable", 60, "watch over")
        settled = time.monotonic()
        _wait_for(lambda: traffic.versions_after(settled).get(2, 0) >= 20, 60, "20 answers from v2")
    assert traffic.statuses() == Counter({200: len(traffic.answers)})
    assert mixed[1] > 0 and mixed[2] > 0  # the canary shared the traffic
    assert set(traffic.versions_after(settled)) == {2}
    assert registry.champion() == v2 and server.state.rollout.status()["refused"] == []
    assert server.state.rollout.last_verdict.passed
    # Recorded where every server (and this one after a restart) finds it: no second canary for v2.
    _wait_for(lambda: versions.version_tags(registry.name, v2).get("refit.canary", "").startswith("passed against v1"),
              30, "the passed canary recorded in MLflow")


def test_manual_rollback_flow_tells_the_server(registry, start_server, tmp_path, prefect_harness):
    from flows.rollback import rollback

    server = start_server(write_policy(tmp_path / "canary.yaml", mode="canary", window_seconds=600))
    v2 = registry.register("good")
    promote.fn(registry.name, v2, 1)
    assert server.state.rollout.status()["phase"] == "canary"
    result = rollback(reason="complaints from support")
    assert (result["champion"], result["rolled_back"]) == (1, v2)
    assert result["server"].startswith("serving v1")
    assert server.state.rollout.status().items() >= {"phase": "stable", "champion": 1, "candidate": None}.items()
    tags = versions.version_tags(registry.name, v2)
    assert tags["refit.rolled_back"] == "complaints from support" and tags["refit.rolled_back_by"] == "manual"
    run = MlflowClient().get_run(tags["refit.rollback_run_id"])
    assert run.data.tags["refit.reason"] == "complaints from support"
    again = rollback(reason="again", return_state=True)  # previous was cleared: nowhere to go
    assert again.is_failed() and "no previous champion" in again.message
