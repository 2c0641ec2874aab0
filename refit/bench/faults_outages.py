"""Faults of ``refit bench faults`` that take a server away: MLflow mid-update, the S3 endpoint under load.

- ``mlflow.down_mid_update``: an update against an ``mlflow server`` that is
  stopped while the update trains; it must fail without moving the champion,
  and the next update through the restarted server recovers.
- ``s3.down_under_load``: ``refit serve`` on an S3 store (moto behind a TCP
  proxy) under load, the endpoint stopped and back; no request may fail with
  a 5xx other than 503, and after a restart on the same spill directory the
  request log must hold every text answered.

Plain functions of a ``Bench`` (``refit.bench.faults``), as in
``refit.bench.faults_safety``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from refit.bench.children import free_port, stop_child, wait_listening, wait_ready
from refit.bench.faults_results import Pending

if TYPE_CHECKING:
    from refit.bench.faults import Bench

BUCKET = "refit-faults"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def mlflow_down(bench: Bench) -> None:
    """An update against an ``mlflow server``, which is stopped while the update trains, then restarted."""
    name = "mlflow.down_mid_update"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    champion = bench.alias("champion")
    bench.progress(f"fault {name}: mlflow server on {uri}, stopped while refit update trains")
    server = _mlflow_server(bench, port)
    env = {"REFIT_MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    paused = bench.points_dir / "update.after_train.paused"
    paused.unlink(missing_ok=True)
    proc, log, started = bench.start("mlflow-down-update", "update", "--labels", str(bench.fresh_file()),
                                     "--force", "--json", faults="update.after_train=pause", env=env)
    deadline = time.monotonic() + 600
    while not paused.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    problems, notes = [], []
    if not paused.exists():
        problems.append("the update never reached training")
    server_rc = stop_child(server, group=True)
    notes.append(f"mlflow server stopped (exit {server_rc}) after training")
    paused.unlink(missing_ok=True)
    child = bench.finish(proc, log, started, proc.wait(timeout=900))
    notes.append(f"update exit {child.rc} after {child.seconds:.0f} s: {child.tail(1)[-200:]}")
    if child.rc == 0:
        problems.append("the update exited 0 with MLflow down")
    problems += bench.champion_gated()
    if bench.alias("champion") != champion:
        problems.append(f"champion moved to v{bench.alias('champion')} with MLflow down")
    bench.progress("recovery: mlflow server restarted, the next update through it")
    server = _mlflow_server(bench, port)
    try:
        recovery = bench.update("recovery-mlflow", env={"REFIT_MLFLOW_TRACKING_URI": uri})
    finally:
        stop_child(server, group=True)
    notes.append(f"recovered by the next update through the restarted server (exit {recovery.rc}, promoted "
                 f"{(recovery.result or {}).get('promoted')})")
    if recovery.rc != 0:
        problems.append(f"the recovery update failed: {recovery.tail()}")
    bench.after_recovery(Pending(name, child, problems, notes))



def _mlflow_server(bench: Bench, port: int) -> subprocess.Popen:
    """``mlflow server`` on the bench's tracking store at ``port``, once its ``/health`` answers."""
    import httpx

    proc = bench.spawn("mlflow-server", ["-m", "mlflow", "server", "--backend-store-uri", bench.settings.tracking_uri,
                                         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"])
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_child(proc, signal.SIGKILL, group=True)
    raise RuntimeError("mlflow server not up within 180 s")


def _s3_client(port: int):
    import boto3

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                        aws_access_key_id="bench", aws_secret_access_key="bench")


@dataclass
class _Endpoint:
    """The S3 endpoint ``refit serve`` sees: moto behind a TCP proxy, so killing the proxy takes the endpoint
    away while the data stays in moto."""

    bench: Bench
    moto_port: int
    port: int
    moto: subprocess.Popen | None = None
    proxy: subprocess.Popen | None = None

    def start(self) -> None:
        self.moto = self.bench.helper("moto", str(self.moto_port), env=S3_KEYS)
        self.proxy = self.bench.helper("proxy", str(self.port), str(self.moto_port))

    def ready(self) -> None:
        """Until the proxy listens and moto holds the bucket."""
        wait_listening(self.port, self.proxy)
        deadline = time.monotonic() + 60
        s3 = _s3_client(self.moto_port)
        while True:
            try:
                s3.create_bucket(Bucket=BUCKET)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def down(self) -> None:
        stop_child(self.proxy, signal.SIGKILL, group=True)

    def up(self) -> None:
        self.proxy = self.bench.helper("proxy", str(self.port), str(self.moto_port))
        wait_listening(self.port, self.proxy)

    def stop(self) -> None:
        stop_child(self.proxy, signal.SIGKILL, group=True)
        stop_child(self.moto, signal.SIGKILL, group=True)


def _logged_rows(store, prefix: str, attempts: int = 10) -> int:
    """Request-log rows under ``prefix``, asked again while the endpoint that just came back settles."""
    for attempt in range(attempts):
        try:
            return len(store.read_parquet_prefix(prefix))
        except Exception:  # noqa: BLE001 - botocore's connection errors: the endpoint is restarting
            if attempt == attempts - 1:
                raise
            time.sleep(1)
    return 0


def _serve_through_outage(bench: Bench, endpoint: _Endpoint, env: dict, url: str, servers: list, seconds: float,
                          concurrency: int, problems: list[str], notes: list[str]) -> int:
    """``refit serve`` under load while the endpoint goes down at a quarter of ``seconds`` and comes back a third
    later; then stopped with SIGTERM. Returns the texts it answered."""
    import numpy as np

    from refit.bench.loadtest import _load

    proc, log, started = bench.start("serve", "serve", env=env)
    servers.append(proc)
    wait_ready(url, proc, timeout=300)
    outage: dict[str, float] = {}

    def down_and_up(t0: float) -> None:
        time.sleep(seconds / 4)
        endpoint.down()
        outage["down"] = time.perf_counter() - t0
        time.sleep(seconds / 3)
        endpoint.up()
        outage["up"] = time.perf_counter() - t0

    load, _ = _load(url, bench.texts, seconds, concurrency, (1, 4), during=down_and_up)
    first = bench.finish(proc, log, started, stop_child(proc, group=True))
    status = np.array(load.status)
    answered = int(np.array(load.texts)[status == 200].sum())
    notes.append(f"{len(status)} requests, {answered} texts answered; endpoint down {outage['down']:.1f}-"
                 f"{outage['up']:.1f} s; server stopped with SIGTERM (exit {first.rc})")
    errors = int(((status >= 500) & (status != 503)).sum())
    if errors:
        problems.append(f"{errors} request(s) failed with 5xx or a dropped connection")
    return answered


def _count_after_restart(bench: Bench, endpoint: _Endpoint, env: dict, url: str, servers: list, answered: int,
                         problems: list[str], notes: list[str]) -> None:
    """``refit serve`` restarted on the same spill directory: the request log must come to hold every text answered."""
    from refit.store import S3Store

    spill = bench.home / "serving-spill"
    spilled = len(list(spill.rglob("*.parquet"))) if spill.exists() else 0
    bench.progress(f"recovery: refit serve restarted on the same spill directory ({spilled} part(s) there)")
    proc, _, _ = bench.start("serve-restart", "serve", env=env)
    servers.append(proc)
    wait_ready(url, proc, timeout=300)
    store = S3Store(BUCKET, "", client=_s3_client(endpoint.port))
    prefix = f"inference/model={bench.name}/"
    deadline = time.monotonic() + 90
    rows = _logged_rows(store, prefix)
    while rows < answered and time.monotonic() < deadline:
        time.sleep(1)
        rows = _logged_rows(store, prefix)
    stop_child(proc, group=True)
    rows = _logged_rows(store, prefix)
    left = len(list(spill.rglob("*.parquet"))) if spill.exists() else 0
    notes.append(f"{spilled} part(s) spilled during the outage, {left} left after the restart; request-log "
                 f"rows {rows} / texts answered {answered}")
    bench.rows_lost += max(0, answered - rows)
    if rows != answered:
        problems.append(f"request-log rows {rows} != texts answered {answered}")


def s3_down(bench: Bench, seconds: float = 24, concurrency: int = 4) -> None:
    """``refit serve`` on an S3 store (moto) under load; the endpoint is stopped at 6 s and back at 14 s."""
    name = "s3.down_under_load"
    endpoint = _Endpoint(bench, free_port(), free_port())
    serve_port = free_port()
    bench.progress(f"fault {name}: refit serve on S3 http://127.0.0.1:{endpoint.port} (moto behind a proxy), "
                   f"{concurrency} clients, endpoint stopped {seconds / 4:.0f}-{seconds * 7 / 12:.0f} s")
    endpoint.start()
    env = S3_KEYS | {"REFIT_STORE": "s3", "REFIT_S3_ENDPOINT_URL": f"http://127.0.0.1:{endpoint.port}",
                     "REFIT_S3_BUCKET": BUCKET, "REFIT_SERVE_PORT": str(serve_port),
                     "REFIT_SERVE_LOG_FLUSH_SECONDS": "1", "REFIT_SERVE_LOG_FLUSH_ROWS": "100",
                     "REFIT_SERVE_POLL_SECONDS": "0", "REFIT_SERVE_LOG_SPILL_DIR": str(bench.home / "serving-spill")}
    url = f"http://127.0.0.1:{serve_port}"
    problems, notes, servers = [], [], []
    try:
        endpoint.ready()
        answered = _serve_through_outage(bench, endpoint, env, url, servers, seconds, concurrency, problems, notes)
        _count_after_restart(bench, endpoint, env, url, servers, answered, problems, notes)
    except Exception as exc:
        problems.append(f"the fault could not run: {type(exc).__name__}: {exc}")
    finally:
        for server in servers:
            stop_child(server, group=True)
        endpoint.stop()
    problems += bench.champion_gated()
    bench.record(name, problems, notes)


# -- the S3 fault's helper processes (python -m refit.bench.faults proxy|moto ...) --------------------------------

def proxy_role(listen: int, target: int) -> None:
    """A TCP proxy: the S3 endpoint's address. Killing it is the endpoint going down; the data stays in moto."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen))
    server.listen(64)

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    while True:
        conn, _ = server.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", target), timeout=10)
            upstream.settimeout(None)
        except OSError:  # the endpoint behind is not answering: this client sees a closed connection, not a dead proxy
            conn.close()
            continue
        threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()


def moto_role(port: str) -> None:
    """``python -m refit.bench.faults moto PORT``: the S3 endpoint's data, behind the proxy."""
    from moto.server import main as moto_main

    moto_main(["-H", "127.0.0.1", "-p", port])
