"""The server fails safe: overload, a crashing model, a store or registry outage and a restart, over real HTTP.

Outages are real: the local store's directory is blocked by a plain file
where the request log (``inference``) or the promotion lock (``locks``) must
go, so the real ``LocalStore`` fails as a full or broken disk would, and
works again once the file is removed. Only the crashing model is patched in
(``ServedModel.predict`` raises): a real model does not fail on demand.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from refit.bench.children import free_port
from refit.store import LocalStore
from registry import versions
from serving.app import WATCHED_TAG
from tasks.deploy import promote
from tests.serving.conftest import unique_texts, write_policy
from tests.serving.test_rollout import Traffic, _wait_for


def _settings(monkeypatch, **env):
    from refit.settings import Settings

    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return Settings()


def _block(settings, folder: str) -> Path:
    """Make the store refuse every write under ``folder``: a plain file stands where its directory must go."""
    blocker = settings.local_store_root / folder
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")
    return blocker


def test_a_flood_far_beyond_the_queue_gets_only_200s_and_503s_with_retry_after(registry, start_server, monkeypatch):
    """48 clients at once, 8 texts each, against a queue of 16 texts: each request is answered (200) or
    refused at once with Retry-After (503); no 500, no dropped connection; the server answers normally after."""
    settings = _settings(monkeypatch, REFIT_SERVE_MAX_QUEUE_TEXTS=16, REFIT_SERVE_REQUEST_TIMEOUT_SECONDS=60,
                         REFIT_SERVE_LOG_FLUSH_ROWS=100000, REFIT_SERVE_LOG_FLUSH_SECONDS=3600)
    server = start_server(settings=settings)
    clients, rounds = 48, 3
    go = threading.Barrier(clients, timeout=60)
    answers: list[tuple[int, str | None, int]] = []  # (status, Retry-After, texts)
    failures: list[str] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        with httpx.Client(timeout=60) as http:
            go.wait()
            for _ in range(rounds):
                texts = unique_texts(registry.adapters.texts, 8)
                try:
                    answer = http.post(server.url + "/predict", json={"texts": texts})
                except httpx.HTTPError as exc:  # a dropped or refused connection
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    answers.append((answer.status_code, answer.headers.get("retry-after"), len(texts)))

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert time.monotonic() - started < 120
    statuses = Counter(status for status, _, _ in answers)
    assert failures == [] and len(answers) == clients * rounds, (failures[:3], statuses)
    assert set(statuses) == {200, 503}, statuses  # some answered, the rest refused, nothing else
    assert all(int(retry) >= 1 for status, retry, _ in answers if status == 503)
    assert server.state.engine.queued_texts == 0

    after = httpx.post(server.url + "/predict", json={"texts": registry.adapters.texts[:3]}, timeout=30)
    assert after.status_code == 200 and len(after.json()["predictions"]) == 3
    metrics = httpx.get(server.url + "/metrics").text
    assert 'refit_requests_total{status="500"}' not in metrics
    assert f'refit_request_errors_total{{kind="overloaded"}} {float(statuses[503])}' in metrics
    server.stop()
    logged = LocalStore(settings.local_store_root).read_parquet_prefix(f"inference/model={settings.model_name}/")
    assert len(logged) == sum(n for status, _, n in answers if status == 200) + 3  # refused texts are not logged


def test_a_request_not_answered_in_time_gets_503_and_does_not_count_against_the_model(registry, start_server,
                                                                                     monkeypatch):
    settings = _settings(monkeypatch, REFIT_SERVE_REQUEST_TIMEOUT_SECONDS=0.001)
    server = start_server(settings=settings)
    answer = httpx.post(server.url + "/predict", json={"texts": registry.adapters.texts[:32]}, timeout=30)
    assert answer.status_code == 503 and int(answer.headers["retry-after"]) >= 1
    assert "no answer within" in answer.json()["error"]
    assert server.state.rollout.champion.stats.figures().errors == 0  # load is not the model's fault


def test_a_500_names_an_error_id_never_the_exception(registry, start_server, monkeypatch, caplog):
    from refit.runtime.served import ServedModel

    server = start_server()

    def crash(self, texts):  # patched in: a real model does not fail on demand
        raise RuntimeError("cannot open /var/lib/refit/secret-config.yaml with password hunter2")

    monkeypatch.setattr(ServedModel, "predict", crash)
    answer = httpx.post(server.url + "/predict", json={"texts": ["book a flight"]}, timeout=30)
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert "error id" in error
    for leak in ("RuntimeError", "secret-config", "hunter2", "/var/lib"):
        assert leak not in answer.text
    error_id = error.split("error id ")[1].split(";")[0]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)  # the log has it all
    monkeypatch.undo()
    assert httpx.post(server.url + "/predict", json={"texts": ["book a flight"]}, timeout=30).status_code == 200


def test_rollout_shows_no_file_paths(registry, start_server, tmp_path):
    server = start_server(write_policy(tmp_path / "canary.yaml", mode="canary"))
    text = httpx.get(server.url + "/rollout").text
    status = json.loads(text)
    assert status["policy_name"] == "canary" and len(status["policy_hash"]) == 16
    assert str(tmp_path) not in text and "/" not in json.dumps({k: v for k, v in status.items() if k != "events"})


def test_request_log_spills_while_the_store_is_down_and_drains_when_it_is_back(registry, start_server, monkeypatch):
    """Rows answered while the store refuses writes wait on local disk, not in memory, and reach the store
    when it is back; rows left on disk by a server stopped during the outage are drained by the next one.
    Before, the buffer grew in memory, and a stop during the outage dropped every row after 5 tries."""
    settings = _settings(monkeypatch, REFIT_SERVE_LOG_FLUSH_ROWS=10, REFIT_SERVE_LOG_FLUSH_SECONDS=0.5)
    store = LocalStore(settings.local_store_root)
    prefix = f"inference/model={settings.model_name}/"
    blocker = _block(settings, "inference")
    server = start_server(settings=settings)
    log = server.state.request_log
    sent = [unique_texts(registry.adapters.texts, 4) for _ in range(10)]
    ids = []
    for texts in sent:
        answer = httpx.post(server.url + "/predict", json={"texts": texts}, timeout=30)
        assert answer.status_code == 200
        ids += [p["request_id"] for p in answer.json()["predictions"]]
    _wait_for(lambda: log.rows_spilled == 40 and log.buffered == 0, 30, "40 rows spilled to local disk")
    assert log.rows_logged == 0
    blocker.unlink()
    _wait_for(lambda: log.rows_logged == 40 and log.rows_spilled == 0, 30, "the spilled rows drained")
    assert sorted(store.read_parquet_prefix(prefix)["request_id"]) == sorted(ids)

    # Down again, and the server stops during the outage: its rows stay on disk for the next server.
    root = settings.local_store_root
    root.rename(root.with_name("store-away"))  # the whole store gone, and a file where it was
    root.write_text("not a directory")
    for texts in sent[:5]:
        answer = httpx.post(server.url + "/predict", json={"texts": texts}, timeout=30)
        ids += [p["request_id"] for p in answer.json()["predictions"]]
    server.stop()
    root.unlink()
    root.with_name("store-away").rename(root)
    assert len(store.read_parquet_prefix(prefix)) == 40
    again = start_server(settings=_settings(monkeypatch, REFIT_SERVE_PORT=free_port()))
    _wait_for(lambda: again.state.request_log.rows_spilled == 0, 30, "the next server drained the rows left")
    assert sorted(store.read_parquet_prefix(prefix)["request_id"]) == sorted(ids)  # every row, once


def test_an_automatic_rollback_is_retried_until_the_registry_takes_it(registry, start_server, tmp_path, monkeypatch):
    """The guard fails while the promotion lock cannot be taken (the store refuses it): the old version
    answers at once, and the rollback is retried until the aliases move back, so the other replicas follow.
    Before, any error but RefitError lost the rollback for good and the registry kept the bad version."""
    settings = _settings(monkeypatch, REFIT_SERVE_REGISTRY_RETRY_SECONDS=0.5)
    policy = write_policy(tmp_path / "canary.yaml", mode="canary", canary_share=0.5, window_seconds=60)
    server = start_server(policy, settings=settings)
    bad = registry.register("bad")
    blocker = _block(settings, "locks")
    with Traffic(server.url, registry.adapters.texts) as traffic:
        _wait_for(lambda: len(traffic.answers) >= 20, 60, "20 answers from v1")
        promote.fn(registry.name, bad, 1)
        _wait_for(lambda: bad in server.state.rollout.refused, 60, "the guard to fail")
        time.sleep(2)  # a few retries, all refused
        assert registry.champion() == bad
        assert httpx.get(server.url + "/rollout").json()["registry_writes_owed"] == [f"rollback of v{bad}"]
        blocker.unlink()
        _wait_for(lambda: registry.champion() == 1, 30, "the rollback to land in MLflow")
    _wait_for(lambda: httpx.get(server.url + "/rollout").json()["registry_writes_owed"] == [], 30, "the record")
    assert traffic.statuses() == Counter({200: len(traffic.answers)})
    tags = versions.version_tags(registry.name, bad)
    assert tags["refit.deployed"] == "rolled back" and tags["refit.rollback_run_id"]
    assert versions.alias_version(registry.name, versions.PREVIOUS) is None


def test_a_restarted_server_canaries_a_champion_no_server_has_watched(registry, start_server, tmp_path):
    """v2 was promoted while no server ran (or the server died mid-canary): the next server serves v1 and
    canaries v2 against it, instead of adopting v2 outright. A version that passed its watch is adopted."""
    policy = write_policy(tmp_path / "canary.yaml", mode="canary", window_seconds=600)
    v2 = registry.register("good")
    promote.fn(registry.name, v2, 1)
    server = start_server(policy)  # ready as soon as v1 answers; v2 loads after it
    _wait_for(lambda: server.state.rollout.status()["candidate"] is not None, 60, "v2 loaded")
    status = server.state.rollout.status()
    assert (status["phase"], status["champion"], status["candidate"]) == ("canary", 1, v2)
    server.stop()

    versions.set_tags(registry.name, v2, {WATCHED_TAG: "passed against v1"})  # what a settled watch writes
    from refit.settings import Settings

    again = start_server(policy, settings=Settings(serve_port=free_port()))
    status = again.state.rollout.status()
    assert (status["phase"], status["champion"], status["candidate"]) == ("stable", v2, None)


@pytest.mark.parametrize("weights", ["adapter_model.bin", "extra.pt"])
def test_an_adapter_with_pickle_weights_is_refused(adapters, tmp_path, weights):
    import shutil

    from refit.errors import RefitError
    from refit.runtime.served import from_adapter

    adapter = Path(shutil.copytree(adapters.good, tmp_path / "adapter"))
    if weights == "adapter_model.bin":  # only a pickle left to load
        (adapter / "adapter_model.safetensors").rename(adapter / weights)
    else:  # a pickle beside the safetensors
        (adapter / weights).write_bytes(b"\x80\x04N.")
    with pytest.raises(RefitError, match="safetensors only"):
        from_adapter(adapter, 1, runtime="torch")
