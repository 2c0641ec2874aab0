"""Fixtures for the serving tests: small real adapters, a real MLflow registry, real servers on 127.0.0.1.

One tiny adapter is trained per session (8 CLINC150 intents, a few steps):
``good``. ``bad`` is the same shape with an untrained head, so it answers
with far lower confidence: the version a guard must catch. Each test gets a
fresh REFIT_HOME (SQLite MLflow, local store) and starts uvicorn in a thread.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import pytest

from refit.bench.children import free_port

TOKEN = "test-admin-token"


@dataclass(frozen=True)
class Adapters:
    good: Path
    bad: Path
    texts: list[str]


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, data_dir) -> Adapters:
    from refit import modeling
    from refit.data import load_clinc150

    frame = load_clinc150(data_dir)
    labels = sorted(label for label in frame["label"].unique() if label != "oos")[:8]
    known = frame[frame["label"].isin(labels)]
    train = known[known["split"] == "train"].groupby("label").head(12)
    root = tmp_path_factory.mktemp("adapters")
    model = modeling.new_model(labels, modeling.LoraSpec(), seed=0)
    ids = {label: i for i, label in enumerate(labels)}
    modeling.train(model, modeling.load_tokenizer(), train["text"].tolist(), train["label"].map(ids).tolist(),
                   epochs=2, learning_rate=5e-3, batch_size=32)
    good = modeling.save_model(model, root / "good")
    bad = modeling.save_model(modeling.new_model(labels, modeling.LoraSpec(), seed=1), root / "bad")
    texts = known[known["split"] == "test"]["text"].tolist()
    return Adapters(good, bad, texts)


class Registry:
    """A fresh MLflow store (SQLite under tmp_path) with versions registered from the adapters."""

    def __init__(self, settings, adapters: Adapters):
        from registry.tracking import configure

        self.settings, self.adapters = settings, adapters
        self.name = settings.model_name
        self.experiment_id = configure(settings)

    def register(self, kind: str) -> int:
        from registry import versions

        with mlflow.start_run(experiment_id=self.experiment_id, run_name=f"test-{kind}") as run:
            mlflow.log_artifacts(str(getattr(self.adapters, kind)), versions.ADAPTER_DIR)
        return versions.register(self.name, run.info.run_id, {"refit.kind": f"test-{kind}"})

    def champion(self) -> int | None:
        from registry import versions

        return versions.alias_version(self.name, versions.CHAMPION)


@pytest.fixture
def serving_env(tmp_path, monkeypatch, data_dir):
    """Settings from the environment: REFIT_HOME in tmp_path, admin token, a free port, fast polls."""
    from refit.settings import Settings

    port = free_port()
    env = {"REFIT_HOME": str(tmp_path / "home"), "REFIT_DATA_DIR": str(data_dir),
           "REFIT_SERVE_ADMIN_TOKEN": TOKEN, "REFIT_SERVE_PORT": str(port),
           "REFIT_SERVE_URL": f"http://127.0.0.1:{port}", "REFIT_SERVE_POLL_SECONDS": "0",
           "REFIT_SERVE_LOG_FLUSH_ROWS": "50", "REFIT_SERVE_LOG_FLUSH_SECONDS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


@pytest.fixture
def registry(serving_env, adapters) -> Registry:
    """v1 (good) registered and champion."""
    from registry import versions

    reg = Registry(serving_env, adapters)
    versions.promote(reg.name, reg.register("good"), expected_champion=None)
    return reg


class RunningServer:
    """uvicorn in a thread of this process, on the settings' port; ``stop`` is a clean shutdown."""

    def __init__(self, settings, policy: str | Path | None = None):
        import uvicorn

        from serving.app import create_app

        self.app = create_app(settings, policy=str(policy) if policy else None)
        self.url = f"http://127.0.0.1:{settings.serve_port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=settings.serve_port,
                                                     log_level="warning", timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)

    @property
    def state(self):
        return self.app.state.server

    def start(self, timeout: float = 120) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server at {self.url} not ready within {timeout:.0f}s")

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "server did not stop"


@pytest.fixture
def start_server(serving_env):
    started: list[RunningServer] = []

    def start(policy: str | Path | None = None, settings=None) -> RunningServer:
        server = RunningServer(settings or serving_env, policy).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.thread.is_alive():
            server.stop()


def write_policy(path: Path, **overrides) -> Path:
    """A rollout policy for tests: the shipped one with short windows, and ``overrides``."""
    import yaml

    from refit.policy import POLICY_DIR

    policy = yaml.safe_load((POLICY_DIR / "rollout.yaml").read_text())
    guards = overrides.pop("guards", {})
    policy.update({"window_seconds": 20, "min_requests": 10, "check_every_seconds": 0.25, "watch_seconds": 5})
    policy.update(overrides)
    policy["guards"].update(guards)
    path.write_text(yaml.safe_dump(policy))
    return path


def unique_texts(texts: list[str], n: int) -> list[str]:
    """``n`` texts, each made unique, so request-log rows can be matched one to one."""
    return [f"{texts[i % len(texts)]} #{uuid.uuid4().hex[:6]}" for i in range(n)]
