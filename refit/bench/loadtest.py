"""``refit bench serve``: a load test of the real server, with a hot swap and a bad version under load.

It starts ``refit serve`` as a subprocess on a free 127.0.0.1 port, sends
real CLINC150 texts from ``concurrency`` client threads for ``seconds``, and
meanwhile promotes (through the deploy step, which tells the server) a copy
of the champion (a swap that must drop nothing) and a deliberately bad
version (an untrained head: far less confident) that the guards must roll
back on their own. It then stops the server cleanly and counts the request
log, and times a plain ``transformers.pipeline`` against the server's own
predictor on the same merged model and batch size, side by side.

It registers two versions in the configured registry (tagged
``refit.kind=bench-copy`` / ``bench-bad``) and puts the original champion
back at the end: point ``REFIT_HOME`` at a scratch home for a clean run.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refit.bench.children import free_port, stop_child, wait_ready
from refit.errors import RefitError
from refit.secrets import mask_uri
from refit.settings import Settings


@dataclass
class Load:
    """What the clients saw: one entry per request."""

    sent: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    texts: list[int] = field(default_factory=list)
    version: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sent: float, latency: float, status: int, texts: int, version: int) -> None:
        with self.lock:
            self.sent.append(sent)
            self.latency.append(latency)
            self.status.append(status)
            self.texts.append(texts)
            self.version.append(version)


def stop_server(proc: subprocess.Popen, timeout: float = 120) -> None:
    """SIGTERM (the server flushes its request log), then SIGKILL if it has not exited within ``timeout``."""
    stop_child(proc, signal.SIGTERM, timeout)


def _client(url: str, texts: list[str], per_request: tuple[int, int], stop: threading.Event, load: Load,
            seed: int) -> None:
    """One client: a request at a time on one kept-alive HTTP/1.1 connection.

    The standard library's ``http.client``, not httpx: the clients share the
    server's cores, and a load generator must not be what limits the server
    (httpx clients took the torch server from 162-170 to 150-154 texts/s
    on two cores, loads taking turns in one script).
    """
    import http.client
    import json
    from urllib.parse import urlsplit

    rng = random.Random(seed)
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        while not stop.is_set():
            batch = rng.sample(texts, rng.randint(*per_request))
            body = json.dumps({"texts": batch})
            sent = time.perf_counter()
            try:
                connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
                answer = connection.getresponse()
                data = answer.read()
                status = answer.status
                version = json.loads(data).get("model_version", 0) if status == 200 else 0
            except (OSError, http.client.HTTPException, ValueError):  # a dropped connection counts as a failure
                status, version = 599, 0
                connection.close()  # reconnects on the next request
            load.add(sent, time.perf_counter() - sent, status, len(batch), version)
    finally:
        connection.close()


def _register_bench_versions(settings: Settings, experiment_id: str, champion: int) -> tuple[int, int]:
    """A copy of the champion (a swap that must pass) and a version with an untrained head (must fail)."""
    import mlflow

    from refit import modeling
    from registry import versions

    source = versions.download_adapter(settings.model_name, champion)
    bad_dir = Path(tempfile.mkdtemp(prefix="refit-bench-bad-"))
    modeling.save_model(modeling.new_model(modeling.read_labels(source), modeling.LoraSpec(), seed=1), bad_dir)
    made = []
    for kind, path in (("bench-copy", source), ("bench-bad", bad_dir)):
        with mlflow.start_run(experiment_id=experiment_id, run_name=kind, tags={"refit.kind": kind}) as run:
            mlflow.log_artifacts(str(path), versions.ADAPTER_DIR)
        made.append(versions.register(settings.model_name, run.info.run_id,
                                      {"refit.kind": kind, "refit.parent_version": str(champion)}))
    return made[0], made[1]


def _bench_policy(window_seconds: float, watch_seconds: float) -> Path:
    """The shipped rollout policy with a window that fits inside the test."""
    import yaml

    from refit.policy import POLICY_DIR

    policy = yaml.safe_load((POLICY_DIR / "rollout.yaml").read_text())
    policy.update({"window_seconds": window_seconds, "watch_seconds": watch_seconds})
    path = Path(tempfile.mkdtemp(prefix="refit-bench-")) / "rollout.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def _promote_under_load(name: str, version: int, what: str, started: float, progress) -> dict:
    """Promote through the deploy step (which tells the server); for the bad version, time the rollback."""
    from registry import versions
    from tasks.deploy import promote

    at = round(time.perf_counter() - started, 1)
    promoted = time.perf_counter()
    promote.fn(name, version, versions.alias_version(name, versions.CHAMPION))
    progress(f"{what}: promoted v{version} at {at} s")
    events = {f"{what}_promoted_at_s": at}
    if what == "bad":
        while versions.alias_version(name, versions.CHAMPION) == version and time.perf_counter() - promoted < 120:
            time.sleep(0.2)
        events["bad_rolled_back_after_s"] = round(time.perf_counter() - promoted, 1)
        progress(f"bad: champion back in MLflow {events['bad_rolled_back_after_s']} s after the promotion")
    return events


def _load(url: str, texts: list[str], seconds: float, concurrency: int, per_request: tuple[int, int],
          seed: int = 0, during: Callable[[float], None] | None = None) -> tuple[Load, float]:
    """``concurrency`` clients for ``seconds``; ``during(started)`` (a ``perf_counter`` time) runs meanwhile.

    Returns what the clients saw and the seconds they ran.
    """
    load, stop = Load(), threading.Event()
    clients = [threading.Thread(target=_client, args=(url, texts, per_request, stop, load, seed + i), daemon=True)
               for i in range(concurrency)]
    started = time.perf_counter()
    for client in clients:
        client.start()
    if during is not None:
        during(started)
    time.sleep(max(0.0, started + seconds - time.perf_counter()))
    stop.set()
    for client in clients:
        client.join(timeout=60)
    return load, time.perf_counter() - started


def compare_throughput(url: str, adapter_dir: Path, texts: list[str], batch_size: int, threads: int,
                       concurrency: int, per_request: tuple[int, int], rounds: int = 3, seconds: float = 10.0,
                       pipeline_texts: int = 1000, runtime: str = "onnx") -> tuple[dict, Load]:
    """Texts per second of the server (HTTP, under load) and of ``transformers.pipeline``, taking turns.

    The pipeline runs in this process on the same merged model with the same
    batch size while the server idles, with torch's default threads and, if
    different, with the server's (``threads``); the server is compared with
    the faster. Rounds alternate so that a busy machine slows all alike; each
    reports its median round. The server's own predictor (same runtime and
    threads), called in-process, is timed beside them.
    """
    import torch
    from transformers import pipeline

    from refit import modeling
    from refit.runtime.served import from_adapter

    default_threads = torch.get_num_threads()
    served = from_adapter(adapter_dir, 0, batch_size, runtime=runtime, threads=threads)
    plain = pipeline("text-classification", model=served.model, tokenizer=served.tokenizer, device="cpu")
    sample = texts[:pipeline_texts]
    plain(sample[:batch_size], batch_size=batch_size)  # warm up both
    served.predict(sample[:batch_size])

    def timed(call, n_threads: int) -> float:
        torch.set_num_threads(n_threads)
        started = time.perf_counter()
        call()
        return len(sample) / (time.perf_counter() - started)

    run_pipeline = lambda: plain(sample, batch_size=batch_size, truncation=True, max_length=modeling.MAX_LENGTH)  # noqa: E731
    pipelines = {f"pipeline_{n}_threads": n for n in dict.fromkeys((default_threads, threads))}
    predictor = f"predictor_in_process_{served.runtime}_{threads}_threads"
    rates: dict[str, list[float]] = {name: [] for name in ("server_http", *pipelines, predictor)}
    everything = Load()
    try:
        for round_ in range(rounds):
            load, elapsed = _load(url, texts, seconds, concurrency, per_request, seed=100 * (round_ + 1))
            rates["server_http"].append(sum(n for n, s in zip(load.texts, load.status) if s == 200) / elapsed)
            for field_name in ("sent", "latency", "status", "texts", "version"):
                getattr(everything, field_name).extend(getattr(load, field_name))
            for name, n_threads in pipelines.items():
                rates[name].append(timed(run_pipeline, n_threads))
            rates[predictor].append(timed(lambda: served.predict(sample), threads))
    finally:
        torch.set_num_threads(default_threads)
    median = {name: float(np.median(values)) for name, values in rates.items()}
    best_pipeline = max(median[name] for name in pipelines)
    return {"batch_size": batch_size, "rounds": rounds, "server_runtime": served.runtime,
            "server_inference_threads": threads, "torch_default_threads": default_threads,
            **{f"{name}_texts_per_s": round(value, 1) for name, value in median.items()},
            "server_http_vs_best_pipeline": round(median["server_http"] / best_pipeline, 2),
            "predictor_vs_best_pipeline": round(median[predictor] / best_pipeline, 2),
            "rounds_texts_per_s": {name: [round(v, 1) for v in values] for name, values in rates.items()}}, everything


def _start_server() -> tuple[str, subprocess.Popen]:
    """``refit serve`` on a free port with a short rollout policy; this process's deploy step is told its address."""
    port, token = free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"REFIT_SERVE_PORT": str(port), "REFIT_SERVE_URL": url, "REFIT_SERVE_ADMIN_TOKEN": token,
                        "REFIT_SERVE_POLL_SECONDS": "0"}
    os.environ.update({k: env[k] for k in ("REFIT_SERVE_URL", "REFIT_SERVE_ADMIN_TOKEN")})  # for the deploy step
    policy = _bench_policy(window_seconds=8, watch_seconds=8)
    log_file = open(Path(tempfile.mkdtemp(prefix="refit-bench-")) / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "refit.cli", "serve", "--port", str(port), "--policy", str(policy)],
                            env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return url, proc


def _promotions(name: str, schedule: list[tuple[float, str, int]], events: dict, progress) -> Callable[[float], None]:
    """What runs during the load: each ``(at, what, version)`` of ``schedule`` promoted ``at`` seconds in."""
    def during(started: float) -> None:
        for at, what, version in schedule:
            time.sleep(max(0.0, started + at - time.perf_counter()))
            events.update(_promote_under_load(name, version, what, started, progress))

    return during


def _load_figures(load: Load, elapsed: float, extra: Load, rows_logged: int) -> dict:
    """Requests, answers, errors, latency and throughput of the load with the swaps, and the request log's count.

    ``extra``: the load of the throughput rounds after it, whose answers the
    request log holds too.
    """
    ok = np.array(load.status) == 200
    latency_ms = np.array(load.latency)[ok] * 1000
    answered_texts = int(np.array(load.texts)[ok].sum())
    extra_answered = sum(n for n, status in zip(extra.texts, extra.status) if status == 200)
    return {
        "requests": len(load.status), "answered": int(ok.sum()),
        "status_counts": {str(k): v for k, v in sorted(Counter(load.status).items())},
        "server_errors_5xx": int(sum(1 for s in load.status if s >= 500)),
        "latency_p50_ms": round(float(np.percentile(latency_ms, 50)), 1),
        "latency_p95_ms": round(float(np.percentile(latency_ms, 95)), 1),
        "requests_per_s": round(int(ok.sum()) / elapsed, 1),
        "texts_per_s": round(answered_texts / elapsed, 1),
        "answered_texts": answered_texts,
        "answered_texts_all_phases": answered_texts + extra_answered,
        "server_errors_5xx_all_phases": int(sum(1 for s in load.status + extra.status if s >= 500)),
        "request_log_rows": rows_logged,
        "log_complete": rows_logged == answered_texts + extra_answered,
        "answers_by_version": {str(k): v for k, v in sorted(Counter(np.array(load.version)[ok].tolist()).items())},
    }


def run(settings: Settings, seconds: float = 60, concurrency: int = 8, per_request: tuple[int, int] = (1, 8),
        swap_at: float | None = 15, bad_at: float | None = 35, compare_rounds: int = 3,
        progress=lambda message: None) -> dict:
    """The whole benchmark; returns the figures ``refit bench serve`` prints."""
    import httpx

    from refit.data import load_clinc150
    from refit.store import open_store
    from registry import versions
    from registry.tracking import configure
    from serving.app import inference_threads

    experiment_id = configure(settings)
    name = settings.model_name
    champion = versions.alias_version(name, versions.CHAMPION)
    if champion is None:
        raise RefitError(f"model {name} has no champion in {mask_uri(settings.tracking_uri)}: run `refit bootstrap` first")
    frame = load_clinc150(settings.data_dir)
    texts = frame[frame["split"] == "test"]["text"].tolist()
    store = open_store(settings)
    prefix = f"inference/model={name}/"
    rows_before = len(store.read_parquet_prefix(prefix))
    copy_version, bad_version = _register_bench_versions(settings, experiment_id, champion)
    progress(f"registered v{copy_version} (copy of v{champion}) and v{bad_version} (untrained head)")

    url, proc = _start_server()
    events: dict[str, float] = {}
    planned = ((swap_at, "swap", copy_version), (bad_at, "bad", bad_version))
    schedule = sorted((at, what, version) for at, what, version in planned if at is not None)
    try:
        wait_ready(url, proc)
        progress(f"server ready at {url}; {seconds:.0f} s of load at concurrency {concurrency}")
        load, elapsed = _load(url, texts, seconds, concurrency, per_request,
                              during=_promotions(name, schedule, events, progress))
        rollout = httpx.get(url + "/rollout", timeout=10).json()
        comparison, extra = None, Load()
        if compare_rounds:
            progress(f"throughput: server under load vs transformers.pipeline, {compare_rounds} alternating rounds")
            comparison, extra = compare_throughput(url, versions.download_adapter(name, champion), texts,
                                                   settings.serve_batch_size, inference_threads(settings),
                                                   concurrency, per_request, rounds=compare_rounds,
                                                   runtime=settings.serve_runtime)
    finally:
        stop_server(proc)
    rows_logged = len(store.read_parquet_prefix(prefix)) - rows_before
    bad_tags = versions.version_tags(name, bad_version)
    result = {
        "seconds": round(elapsed, 1), "concurrency": concurrency, "texts_per_request": f"{per_request[0]}-{per_request[1]}",
        **_load_figures(load, elapsed, extra, rows_logged),
        "versions": {"champion_before": champion, "swap_to": copy_version, "bad": bad_version},
        "bad_version_rolled_back": bad_tags.get("refit.deployed") == "rolled back",
        "bad_version_reason": bad_tags.get("refit.rolled_back"),
        "rollback_run_id": bad_tags.get("refit.rollback_run_id"),
        "server_phase_at_end": rollout["phase"], "server_champion_at_end": rollout["champion"],
    } | events | {"throughput": comparison}
    now = versions.alias_version(name, versions.CHAMPION)
    if now != champion:  # leave the registry as it was found
        versions.promote(name, champion, expected_champion=now)
    return result
