"""The local stack: a Prefect server, a process worker and an MLflow server on 127.0.0.1.

``refit stack up`` is the one-machine version of ``infra/compose.yaml``,
without Docker: the same flows run from deployments, so the Prefect server
path (schedules, event triggers, hand-run deployments) can be tried and
tested on a laptop. With ``REFIT_STORE=s3`` and no endpoint configured it also
starts a moto S3 endpoint (in memory: it keeps nothing across restarts; use
MinIO from compose for data you want to keep).

Each service runs in its own process group with a pid file and a log under
``REFIT_HOME/stack``, so ``down`` stops it and every child it started (uvicorn
workers, flow-run subprocesses) even if the terminal that started it is
gone. What can persist does, under ``REFIT_HOME``: Prefect's SQLite database
(``prefect/``, the same one the embedded runs use), MLflow's (``mlflow.db``)
and, on the local store, the artifacts.

This module starts processes and talks HTTP; it imports neither Prefect nor
MLflow (``refit/`` never does), it runs their command lines.

No secret is written or printed: ``stack.json`` holds no ``AWS_*`` key (a
real endpoint's credentials stay in the caller's environment, which the
services inherit; the moto endpoint takes fixed placeholder ones, given to
its clients when they start), and ``status`` masks every secret-looking
value and URI password (``refit.secrets``).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from refit import processes
from refit.errors import RefitError
from refit.secrets import is_secret_name, mask_env, mask_uri
from refit.settings import OFFLINE_ENV, PROJECT_ROOT, Settings, settings_error

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
# Flow runs started by the worker send a heartbeat this often (seconds, Prefect's minimum is 30), so
# that the automation in ZOMBIE_AUTOMATION marks a run whose process died (a killed worker) Crashed.
WORKER_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
ZOMBIE_AUTOMATION = PROJECT_ROOT / "infra" / "prefect" / "crash-zombies.yaml"
# Placeholder credentials for the local moto endpoint only (moto checks none): public, never the caller's.
# A real endpoint takes the caller's AWS variables from the environment, never from stack.json.
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "refit", "AWS_SECRET_ACCESS_KEY": "refit-secret"}


@dataclass(frozen=True)
class Ports:
    prefect: int = 4200
    mlflow: int = 5000
    s3: int = 9000


@dataclass(frozen=True)
class Service:
    """One process of the stack: how to start it and how to tell it is ready."""

    name: str
    argv: list[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    marker: str = ""  # a word its command line contains: a recycled pid is never taken for it


def stack_dir(settings: Settings) -> Path:
    return settings.home_dir / "stack"


def _python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def plan(settings: Settings, ports: Ports, pool: str) -> tuple[list[Service], dict[str, str]]:
    """The services to start, in order, and the environment a client shell needs to use them.

    The worker gets the client environment too: its flow runs read the same
    settings (MLflow at the server, the same store, this checkout's code).
    """
    home = settings.home_dir
    prefect_url, mlflow_url = f"http://{HOST}:{ports.prefect}", f"http://{HOST}:{ports.mlflow}"
    client = {
        "REFIT_HOME": str(home),
        "REFIT_STORE": settings.store,
        "REFIT_MLFLOW_TRACKING_URI": mlflow_url,
        "REFIT_PROJECT_DIR": str(PROJECT_ROOT),
        "REFIT_DATA_DIR": str(settings.data_dir.expanduser().resolve()),
        "PREFECT_API_URL": f"{prefect_url}/api",
        "PREFECT_HOME": str(home / "prefect"),
    }
    services: list[Service] = []
    if settings.store == "s3":
        client |= {"REFIT_S3_BUCKET": settings.s3_bucket, "AWS_DEFAULT_REGION": settings.s3_region}
        if settings.s3_endpoint_url:
            client["REFIT_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
        else:
            s3_url = f"http://{HOST}:{ports.s3}"
            client |= {"REFIT_S3_ENDPOINT_URL": s3_url}
            services.append(Service("s3", _python_module("moto.server", "-H", HOST, "-p", str(ports.s3)), s3_url,
                                    marker="moto"))
        client["MLFLOW_S3_ENDPOINT_URL"] = client["REFIT_S3_ENDPOINT_URL"]
    services.append(Service(
        "mlflow",
        _python_module("mlflow", "server", "--host", HOST, "--port", str(ports.mlflow), "--workers", "1",
                       "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                       "--default-artifact-root", settings.artifact_location, "--no-serve-artifacts"),
        mlflow_url, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, marker="mlflow"))
    services.append(Service(
        "prefect-server",
        _python_module("prefect", "server", "start", "--host", HOST, "--port", str(ports.prefect), "--analytics-off"),
        prefect_url, env={"PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}, marker="prefect"))
    services.append(Service(
        "worker",
        _python_module("prefect", "worker", "start", "--pool", pool, "--type", "process", "--name",
                       f"refit-{pool}-local", "--install-policy", "never"),
        prefect_url, env=WORKER_ENV, marker="prefect"))
    return services, client


# -- processes ---------------------------------------------------------------------------------------------

def _pid_file(settings: Settings, name: str) -> Path:
    return stack_dir(settings) / f"{name}.pid"


def running_pid(settings: Settings, service: Service) -> int | None:
    """The pid in the service's pid file, if that process is alive and is the service."""
    try:
        pid = int(_pid_file(settings, service.name).read_text().strip())
    except (OSError, ValueError):
        return None
    line = processes.cmdline(pid)
    if not line or service.marker not in line:
        return None
    return pid


def _signal_all(pids: list[int], group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_process(pid: int, grace: float = 15.0) -> None:
    """SIGTERM the process group and every descendant, then SIGKILL what is left after ``grace`` seconds."""
    pids = [pid, *processes.descendants(pid)]
    _signal_all(pids, pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(processes.alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if processes.alive(p)]
    if left:
        _signal_all(left, pid, signal.SIGKILL)
    try:  # reap it if it is our child (a test starts and stops in one process)
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is not "taken"
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _with_credentials(client: dict[str, str], services: list[Service]) -> dict[str, str]:
    """The client environment a started process gets: moto's placeholder keys when the stack runs moto."""
    return client | MOTO_CREDENTIALS if any(s.name == "s3" for s in services) else client


def _start(settings: Settings, service: Service, client_env: dict[str, str]) -> subprocess.Popen:
    directory = stack_dir(settings)
    env = os.environ | OFFLINE_ENV | client_env | service.env
    log = open(directory / f"{service.name}.log", "ab")
    log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(service.argv)}\n".encode())
    log.flush()
    with log:
        proc = subprocess.Popen(service.argv, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    _pid_file(settings, service.name).write_text(f"{proc.pid}\n")
    return proc


# -- health --------------------------------------------------------------------------------------------------

def _http(url: str, data: dict | None = None, timeout: float = 3.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def healthy(service: Service, pool: str) -> bool:
    """Whether the service answers as it should: an API health call, or, for the worker, online in its pool."""
    try:
        if service.name == "s3":
            return _http(service.url)[0] > 0
        if service.name == "mlflow":
            return _http(f"{service.url}/health")[0] == 200
        if service.name == "prefect-server":
            return _http(f"{service.url}/api/health")[0] == 200
        status, body = _http(f"{service.url}/api/work_pools/{pool}/workers/filter", data={})
        return status == 200 and any(w.get("status") == "ONLINE" and w.get("name") == f"refit-{pool}-local"
                                     for w in json.loads(body))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_healthy(settings: Settings, services: list[Service], pool: str, timeout: float,
                  started: dict[str, subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(services)
    while waiting:
        for service in list(waiting):
            proc = started.get(service.name)
            if (proc.poll() is not None) if proc else running_pid(settings, service) is None:
                log = stack_dir(settings) / f"{service.name}.log"
                tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-5:]).strip()
                raise RefitError(f"{service.name} exited while starting (log {log}): {tail[-500:]}")
            if healthy(service, pool):
                waiting.remove(service)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(s.name for s in waiting)
            raise RefitError(f"{names} not healthy after {timeout:.0f} s; see the logs in {stack_dir(settings)}")
        if waiting:
            time.sleep(0.5)


# -- commands ------------------------------------------------------------------------------------------------

def _load_state(settings: Settings) -> dict | None:
    try:
        return json.loads((stack_dir(settings) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _services_from_state(state: dict) -> list[Service]:
    return [Service(**s) for s in state["services"]]


def up(settings: Settings, ports: Ports = Ports(), pool: str = "refit", timeout: float = 180.0,
       echo: Callable[[str], None] = lambda _: None) -> dict:
    """Start whatever of the stack is not running and wait until all of it is healthy.

    Running it again is harmless: services already up are left alone. A port
    taken by something else is an error that names the option to change.
    """
    directory = stack_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    state = _load_state(settings)
    if state and any(running_pid(settings, s) for s in _services_from_state(state)):
        if state["ports"] != ports.__dict__ or state["pool"] != pool:
            echo(f"the stack is already running with ports {state['ports']} and pool {state['pool']}; keeping them")
        pool = state["pool"]
    else:
        services, client = plan(settings, ports, pool)
        state = {"pool": pool, "ports": ports.__dict__, "services": [s.__dict__ for s in services],
                 "client_env": {k: v for k, v in client.items() if not is_secret_name(k)}}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
    services = _services_from_state(state)
    client = _with_credentials(state["client_env"], services)

    servers, worker = services[:-1], services[-1]
    started: dict[str, subprocess.Popen] = {}
    for group in (servers, [worker]):
        for service in group:
            if running_pid(settings, service):
                echo(f"{service.name}: already running")
                continue
            port = int(service.url.rsplit(":", 1)[1])
            if service.name != "worker" and not _port_free(port):
                option = {"s3": "--s3-port", "mlflow": "--mlflow-port"}.get(service.name, "--prefect-port")
                raise RefitError(f"port {port} on {HOST} is taken by another program: choose another with {option}")
            started[service.name] = _start(settings, service, client)
            echo(f"{service.name}: started (pid {started[service.name].pid}), "
                 f"log {directory / (service.name + '.log')}")
        _wait_healthy(settings, group, pool, timeout, started)
        if group is servers:
            if settings.store == "s3":
                _ensure_bucket(settings, client)
            _ensure_zombie_automation(client, echo)
    return status(settings)


def _ensure_zombie_automation(client: dict[str, str], echo: Callable[[str], None]) -> None:
    """Create the automation that marks dead flow runs Crashed, unless the server has it already."""
    name = yaml.safe_load(ZOMBIE_AUTOMATION.read_text())["name"]
    try:
        status_code, body = _http(f"{client['PREFECT_API_URL']}/automations/filter", data={}, timeout=30)
    except (urllib.error.URLError, OSError) as exc:
        raise RefitError(f"the Prefect server did not answer about automations: {exc}") from None
    if status_code != 200:
        raise RefitError(f"the Prefect server answered {status_code} when asked for its automations")
    if any(a.get("name") == name for a in json.loads(body)):
        return
    proc = subprocess.run(_python_module("prefect", "--no-prompt", "automation", "create", "--from-file",
                                         str(ZOMBIE_AUTOMATION)),
                          env=os.environ | OFFLINE_ENV | client, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise RefitError(f"could not create the Prefect automation {name}: {(proc.stdout + proc.stderr)[-500:]}")
    echo(f"automation {name}: created (marks flow runs without a heartbeat Crashed)")


def _ensure_bucket(settings: Settings, client: dict[str, str]) -> None:
    """The bucket must exist before MLflow or a flow writes to it."""
    from refit.store import S3Store

    saved = {k: os.environ.get(k) for k in MOTO_CREDENTIALS}
    os.environ.update({k: client[k] for k in MOTO_CREDENTIALS if k in client})
    try:
        S3Store(settings.s3_bucket, settings.s3_prefix, endpoint_url=client["REFIT_S3_ENDPOINT_URL"],
                region=settings.s3_region).ensure_bucket()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def down(settings: Settings, echo: Callable[[str], None] = lambda _: None) -> list[str]:
    """Stop every service of the stack, the worker first; returns the names stopped."""
    state = _load_state(settings)
    if state is None:
        return []
    stopped = []
    for service in reversed(_services_from_state(state)):
        pid = running_pid(settings, service)
        if pid:
            stop_process(pid)
            stopped.append(service.name)
            echo(f"{service.name}: stopped (pid {pid})")
        _pid_file(settings, service.name).unlink(missing_ok=True)
    (stack_dir(settings) / STATE_FILE).unlink(missing_ok=True)
    return stopped


def status(settings: Settings) -> dict:
    """Each service's pid, URL, health and log; ``running`` is true only when all are healthy."""
    state = _load_state(settings)
    if state is None:
        return {"running": False, "services": {}, "env": {}}
    services = {}
    for service in _services_from_state(state):
        pid = running_pid(settings, service)
        services[service.name] = {"pid": pid, "url": service.url,
                                  "healthy": bool(pid) and healthy(service, state["pool"]),
                                  "log": str(stack_dir(settings) / f"{service.name}.log")}
    return {"running": all(s["healthy"] for s in services.values()), "pool": state["pool"],
            "services": services, "env": mask_env(state["client_env"])}


def client_env(settings: Settings) -> dict[str, str]:
    """What a shell (or a test) exports to use the running stack: no secret in it (see ``env_lines``)."""
    state = _load_state(settings)
    if state is None:
        raise RefitError(f"no stack under {stack_dir(settings)}: run `refit stack up` first")
    return {k: v for k, v in state["client_env"].items() if not is_secret_name(k)}


def env_lines(settings: Settings) -> list[str]:
    """``export`` lines for a shell. Credentials are never printed: a moto stack's placeholders are set
    only where the shell has none (``${AWS_ACCESS_KEY_ID:-...}``); a real endpoint uses the shell's own.
    (The stack's own URIs carry no password; one that did would be printed masked, not in clear.)"""
    state = _load_state(settings)
    lines = [f"export {key}={shlex.quote(mask_uri(value))}" for key, value in client_env(settings).items()]
    if state is not None and any(s["name"] == "s3" for s in state["services"]):
        lines += [f'export {key}="${{{key}:-{value}}}"' for key, value in MOTO_CREDENTIALS.items()]
    return lines


# -- CLI ------------------------------------------------------------------------------------------------------

app = typer.Typer(help="The local stack on 127.0.0.1: Prefect server and worker, MLflow server (and S3 with --store s3).",
                  no_args_is_help=True)


def _settings(store: str | None) -> Settings:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if store:
        if store not in ("local", "s3"):
            raise RefitError(f"--store must be local or s3, not {store!r}")
        os.environ["REFIT_STORE"] = store
    try:
        return Settings()
    except Exception as exc:  # pydantic's ValidationError, in one line
        raise RefitError(f"invalid settings: {settings_error(exc)}") from exc


def _print_status(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    if not result["services"]:
        Console(stderr=True).print("no stack under this REFIT_HOME: start one with `refit stack up`")
        return
    table = Table(title="refit stack" + ("" if result["running"] else " (not all healthy)"))
    for column in ("service", "url", "pid", "healthy", "log"):
        table.add_column(column)
    for name, s in result["services"].items():
        table.add_row(name, s["url"], str(s["pid"] or "-"), "yes" if s["healthy"] else "[red]no[/]", s["log"])
    Console().print(table)


@app.command("up")
def up_command(prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
               mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
               s3_port: Annotated[int, typer.Option(help="moto S3 port (with --store s3 and no endpoint set).")] = 9000,
               pool: Annotated[str, typer.Option(help="Process work pool the worker polls.")] = "refit",
               store: Annotated[Optional[str], typer.Option("--store", help="Object store: local or s3.")] = None,
               timeout: Annotated[float, typer.Option(help="Seconds to wait for each step to be healthy.")] = 180.0,
               as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False) -> None:
    """Start the stack and wait until every service is healthy.

    Example: refit stack up && eval "$(refit stack env)" && prefect deploy --all
    """
    settings = _settings(store)
    err = Console(stderr=True)
    result = up(settings, Ports(prefect_port, mlflow_port, s3_port), pool, timeout, echo=err.print)
    _print_status(result, as_json)
    if not as_json:
        err.print('Use it from this shell: eval "$(refit stack env)"   then: prefect deploy --all')
        if "s3" in result["services"]:
            err.print("The S3 endpoint is moto: it keeps everything in memory, nothing survives `refit stack down`.")


@app.command("down")
def down_command() -> None:
    """Stop every service of the stack (pid files under REFIT_HOME/stack).

    Example: refit stack down
    """
    settings = _settings(None)
    err = Console(stderr=True)
    if not down(settings, echo=err.print):
        err.print("nothing was running")


@app.command("status")
def status_command(as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False) -> None:
    """Show each service's URL, pid and health; exit code 1 unless all are healthy.

    Example: refit stack status --json
    """
    result = status(_settings(None))
    _print_status(result, as_json)
    if not result["running"]:
        raise typer.Exit(1)


@app.command("env")
def env_command() -> None:
    """Print `export` lines that point this shell (prefect, refit, mlflow) at the running stack.

    Example: eval "$(refit stack env)"
    """
    for line in env_lines(_settings(None)):
        print(line)
