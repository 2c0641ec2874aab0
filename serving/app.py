"""The inference service: ``/predict`` on the ``champion`` alias, with canary, guards and rollback.

Endpoints: ``POST /predict`` ({"texts": [...]}: a label, confidence, request
id and model version per text), ``GET /healthz`` (alive), ``GET /readyz``
(a model is loaded), ``GET /metrics`` (Prometheus), ``GET /rollout`` (routing
state and the last guard verdict), ``POST /admin/reload`` (bearer token: load
the champion now; what deploy calls after a promotion).

Background work, all started and stopped by the app's lifespan: the
micro-batching engine, the request-log flusher, the alias poll, the guard
check and the registry retry. A clean stop answers every request already
received, then writes every logged row.

Failing safe: a full queue or a late answer is a 503 with ``Retry-After``;
a 500 names an error id, never the exception; a registry write the server
owes (an automatic rollback, a passed canary) is retried until it lands; a
restarted server canaries a champion no server has watched yet against
``previous`` instead of serving it outright.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from refit.policy import file_hash
from refit.requestlog import new_request_id
from refit.settings import Settings
from refit.store import ObjectStore
from refit.runtime.cascade import served_by_champion
from registry.served import load_version, record_fallback, with_cascade
from serving.engine import Engine, Overloaded
from serving.feedback import FeedbackQuota, add_feedback_route, parse_feedback
from serving.guards import GuardVerdict, LiveStats, RolloutPolicy, load_rollout_policy
from serving.http import add_error_handlers, authorize, internal_error, read_body
from serving.label_events import LABELS_EVENT, LabelEvents
from serving.metrics import Metrics
from refit.runtime.served import ServedModel
from serving.registry_writes import WATCHED_TAG, RegistryWrites, record_rollback, watched_tags
from serving.requestlog import RequestLog
from serving.rollout import Rollout, Slot
from serving.schema import BadRequest, Limits, parse_texts

log = logging.getLogger("refit.serving")
# Names other modules and tests import from here; they live in the modules named above.
__all__ = ["FeedbackQuota", "LABELS_EVENT", "LabelEvents", "Server", "WATCHED_TAG", "create_app",
           "inference_threads", "parse_feedback"]


class Server:
    """Everything one app holds: settings, model routing, engine, request log, metrics."""

    def __init__(self, settings: Settings, store: ObjectStore, policy: RolloutPolicy, policy_path: Path | None):
        self.settings, self.store, self.policy, self.policy_path = settings, store, policy, policy_path
        self.policy_name = policy_path.stem if policy_path else None
        self.policy_hash = file_hash(policy_path) if policy_path else None
        self.model_name = settings.model_name
        self.limits = Limits(settings.serve_max_texts, settings.serve_max_text_chars)
        self.metrics = Metrics()
        self.stats: dict[int, LiveStats] = {}
        self.rollout = Rollout(policy, lambda: LiveStats(settings.cpu_usd_per_hour), self._on_rollback,
                               on_settle=self._on_settle)
        self.engine = Engine(settings.serve_batch_size, self._on_pass, settings.serve_batch_wait_ms / 1000,
                             settings.serve_max_queue_texts, settings.serve_request_timeout_seconds)
        self.request_log = RequestLog(store, self.model_name, settings.serve_log_flush_rows,
                                      settings.serve_log_flush_seconds,
                                      settings.serve_log_spill_dir or settings.home_dir / "serving" / "spill")
        self.registry_writes = RegistryWrites(settings.serve_registry_retry_seconds)
        self.experiment_id: str | None = None
        self._loading = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._threads_before = 0
        self._blas_limits = None  # threadpoolctl's limiter while started
        self._background: set[asyncio.Task] = set()

    # -- models ------------------------------------------------------------
    def _load(self, version: int) -> ServedModel:
        # Each version is tokenized by its own base's tokenizer: versions of one model may sit on different bases.
        model = load_version(self.model_name, version, self.settings.serve_batch_size, None,
                             self.settings.serve_runtime, inference_threads(self.settings, "onnx"))
        return with_cascade(self.model_name, version, model)

    async def reload(self) -> dict:
        """Serve the version behind the champion alias, if it is not the one served already."""
        from registry import versions

        async with self._loading:
            version = await asyncio.to_thread(versions.alias_version, self.model_name, versions.CHAMPION)
            if version is None:
                return {"loaded": None, "adopted": "nothing: no champion registered yet"}
            if version == self.rollout.serving_version:
                return {"loaded": version, "adopted": "already serving"}
            if version in self.rollout.refused:
                return {"loaded": self.rollout.serving_version, "adopted": f"v{version} was rolled back here"}
            started = time.monotonic()
            if self.rollout.champion is None:
                baseline = await asyncio.to_thread(self._baseline_for, version)
                if baseline is not None:  # first serve the version it replaced, then canary it against that one
                    try:
                        self.rollout.adopt(await asyncio.to_thread(self._load, baseline))
                    except Exception as exc:  # noqa: BLE001 - no baseline to go back to: serve the champion as is
                        log.warning("v%d (previous) could not be loaded to canary v%d against (%s: %s); serving "
                                    "v%d directly", baseline, version, type(exc).__name__, exc, version)
            model = await asyncio.to_thread(self._load, version)
            adopted = self.rollout.adopt(model)
            self._update_version_gauges()
            log.info("loaded v%d in %.1fs (%s)", version, time.monotonic() - started, adopted)
            return {"loaded": version, "adopted": adopted, "load_seconds": round(time.monotonic() - started, 2)}

    def _baseline_for(self, version: int) -> int | None:
        """The version a (re)starting server canaries ``version`` against, or None to serve it directly.

        Directly: the policy says so, or the version passed a canary and its
        watch on some server (tag ``refit.canary``), or there is nothing it
        replaced (the bootstrap). Otherwise, after a restart mid-canary, or a
        promotion that happened while no server ran, it is canaried against
        ``previous``, as a running server would have done.
        """
        from registry import versions

        if self.policy.mode == "direct":
            return None
        if versions.version_tags(self.model_name, version).get(WATCHED_TAG, "").startswith("passed"):
            return None
        previous = versions.alias_version(self.model_name, versions.PREVIOUS)
        return previous if previous is not None and previous != version else None

    def _update_version_gauges(self) -> None:
        status = self.rollout.status()
        self.metrics.model_version.labels("champion").set(status["champion"] or 0)
        self.metrics.model_version.labels("candidate").set(status["candidate"] or 0)

    # -- rollback ----------------------------------------------------------
    def _on_rollback(self, verdict: GuardVerdict, phase: str, restored: int) -> None:
        """The guard failed and the old version already answers; now make the registry agree (retried)."""
        self.metrics.rollbacks.inc()
        self._update_version_gauges()
        self.registry_writes.submit(f"rollback of v{verdict.new_version}", record_rollback, self.model_name, verdict,
                                    phase, restored, self.policy, self.experiment_id, self.store)

    def _on_settle(self, version: int, baseline: int) -> None:
        """A version passed its canary and watch here: say so in the registry, so a restart need not redo it."""
        from registry import versions

        self.registry_writes.submit(f"canary of v{version}", versions.set_tags, self.model_name, version,
                                    watched_tags(baseline))

    # -- inference ---------------------------------------------------------
    def _on_pass(self, slot: Slot, texts: int, cpu_seconds: float) -> None:
        self.metrics.batch_texts.observe(texts)
        slot.stats.record_inference(texts, cpu_seconds)

    async def predict(self, texts: list[str]) -> dict:
        received = time.perf_counter()
        slot, shadow = self.rollout.route()
        if slot is None:
            raise BadRequest(503, "no model loaded yet: the server is starting or no champion is registered")
        try:
            labels, confidence, *tiers = await self.engine.predict(slot, texts)
        except Overloaded:
            raise  # load, not the model's fault: the guards do not count it
        except Exception:
            slot.stats.record_request(time.perf_counter() - received, None)
            raise
        latency = time.perf_counter() - received
        slot.stats.record_request(latency, confidence)
        if shadow is not None:
            self._mirror(shadow, texts)
        version = str(slot.version)
        now = datetime.now(timezone.utc)
        served_by = tiers[0] if tiers else served_by_champion(texts)
        rows = [{"request_id": new_request_id(now), "timestamp": now, "text": text, "predicted_label": label,
                 "confidence": float(conf), "model_version": version, "served_by": tier}
                for text, label, conf, tier in zip(texts, labels, confidence, served_by)]
        self.request_log.append(rows)
        self._observe(version, latency, labels, confidence)
        return {"model_version": slot.version, "predictions": [
            {"request_id": r["request_id"], "label": r["predicted_label"], "confidence": round(r["confidence"], 6),
             "model_version": slot.version, "served_by": r["served_by"]} for r in rows]}

    def _mirror(self, slot: Slot, texts: list[str]) -> None:
        """Shadow: the new version scores a copy; its answer is measured, never returned or logged."""
        async def score() -> None:
            started = time.perf_counter()
            try:
                _, confidence, *_ = await self.engine.predict(slot, texts)
            except Overloaded:
                return  # no room for the copy: the shadow sees less traffic, nobody waits for it
            except Exception:
                slot.stats.record_request(time.perf_counter() - started, None)
                return
            slot.stats.record_request(time.perf_counter() - started, confidence)

        task = asyncio.get_running_loop().create_task(score())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _observe(self, version: str, latency: float, labels: list[str], confidence) -> None:
        m = self.metrics
        m.requests.labels("200").inc()
        m.latency.labels(version).observe(latency)
        for label in labels:
            m.predictions.labels(label, version).inc()
        m.confidence_sum.labels(version).inc(float(confidence.sum()))

    def refresh_gauges(self) -> None:
        for slot in (self.rollout.champion, self.rollout.candidate):
            if slot is not None and slot.stats.requests:
                figures = slot.stats.figures()
                self.metrics.mean_confidence.labels(str(slot.version)).set(figures.mean_confidence)
                self.metrics.cost_per_1k.labels(str(slot.version)).set(figures.cost_per_1k_usd)
            cascade = getattr(getattr(slot, "model", None), "stats", None)  # a cascade's tiers (TierStats)
            if cascade is not None and cascade.texts:
                self.metrics.student_share.labels(str(slot.version)).set(cascade.student_share)
                for tier, seconds in cascade.cpu_seconds_per_1k().items():
                    self.metrics.tier_cpu_per_1k.labels(str(slot.version), tier).set(seconds)
        self.metrics.log_rows.set(self.request_log.rows_logged)
        self.metrics.log_buffered.set(self.request_log.buffered + self.request_log.rows_spilled)

    # -- background --------------------------------------------------------
    async def _every(self, seconds: float, what, name: str) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await what()
            except Exception:
                log.exception("%s failed; trying again in %.0fs", name, seconds)

    async def _check_guards(self) -> None:
        if self.rollout.check() is not None:
            self._update_version_gauges()
        for slot in (self.rollout.champion, self.rollout.candidate):
            guard = getattr(slot.model, "guard", None) if slot is not None else None
            if guard is not None and guard.tripped and not guard.recorded:  # a cascade's share collapsed
                guard.recorded = True
                self.registry_writes.submit(f"cascade fallback of v{slot.version}", record_fallback, self.model_name,
                                            slot.version, guard.tripped, self.experiment_id)

    async def start(self) -> None:
        import torch
        from threadpoolctl import threadpool_limits

        from registry.tracking import configure

        self._threads_before = torch.get_num_threads()  # restored on stop: tests run servers in-process
        torch.set_num_threads(inference_threads(self.settings, "torch"))  # torch answers on a failed export too
        # A cascade's student multiplies a micro-batch by its word vectors' weights: too small a product for
        # threads, whose spinning after it would be billed to every pass that follows.
        self._blas_limits = threadpool_limits(limits=1, user_api="blas")
        try:
            self.experiment_id = await asyncio.to_thread(configure, self.settings)
        except BaseException:
            self._restore_threads()
            raise
        self.request_log.start()
        self.engine.start()
        self._tasks.append(asyncio.create_task(self._first_load(), name="first-load"))
        self._tasks.append(asyncio.create_task(
            self._every(self.policy.check_every_seconds, self._check_guards, "guard check"), name="guards"))
        self._tasks.append(asyncio.create_task(
            self._every(self.settings.serve_registry_retry_seconds, self.registry_writes.retry_all, "registry retry"),
            name="registry-retry"))
        if self.settings.serve_poll_seconds > 0:
            self._tasks.append(asyncio.create_task(
                self._every(self.settings.serve_poll_seconds, self.reload, "alias poll"), name="poll"))

    async def _first_load(self) -> None:
        try:
            log.info("champion: %s", await self.reload())
        except Exception:
            log.exception("loading the champion failed; the alias poll will try again")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.registry_writes.wait()
        if self.registry_writes.pending:
            log.error("stopping with registry writes not done: %s; the next server's canary repeats them",
                      ", ".join(self.registry_writes.pending))
        await self.engine.stop()
        await asyncio.to_thread(self.request_log.close)
        self._restore_threads()
        log.info("stopped: %d request-log rows written in %d parts", self.request_log.rows_logged,
                 self.request_log.parts_written)

    def _restore_threads(self) -> None:
        """Torch's and BLAS's thread counts as they were before ``start``; once."""
        if self._threads_before:
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = 0
        if self._blas_limits is not None:
            self._blas_limits.restore_original_limits()
            self._blas_limits = None


def inference_threads(settings: Settings, runtime: str | None = None) -> int:
    """Threads for the forward pass on ``runtime`` (the configured one by default).

    ONNX Runtime: every available core (affinity, cgroup quota). Its pass is one call that leaves Python's lock
    to the event loop, and its idle threads sleep rather than spin.
    torch: one core is left to HTTP, JSON and the request log, since its
    eager pass takes the lock back between operations and its threads spin;
    on a busy machine every core in the pass halved throughput (measured in
    ``refit bench serve``). ``REFIT_SERVE_TORCH_THREADS`` overrides both.
    """
    from refit.processes import available_cpus

    cores = available_cpus()
    runtime = runtime or settings.serve_runtime
    return settings.serve_torch_threads or (cores if runtime == "onnx" else max(1, cores - 1))


def create_app(settings: Settings | None = None, store: ObjectStore | None = None,
               policy: str | None = None) -> FastAPI:
    """The app for ``settings`` (default: from the environment); nothing connects until it starts."""
    from refit.store import open_store

    settings = settings or Settings()
    rollout_policy, policy_path = load_rollout_policy(policy or settings.serve_rollout_policy)
    server = Server(settings, store or open_store(settings), rollout_policy, policy_path)
    label_events = LabelEvents.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()
            await asyncio.to_thread(label_events.stop)

    app = FastAPI(title="refit serving", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.state.label_events = label_events

    add_error_handlers(app, server.metrics)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        """{"texts": ["book a flight to Paris"]} -> a label, confidence and model version per text."""
        body = await read_body(request, server.limits.max_body_bytes)
        texts = parse_texts(body, server.limits)
        try:
            return JSONResponse(await server.predict(texts))
        except (BadRequest, Overloaded):
            raise
        except Exception as exc:
            return internal_error(server.metrics, "prediction failed", "inference", exc)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        version = server.rollout.serving_version
        if version is None:
            return JSONResponse({"status": "not ready: no model loaded"}, status_code=503)
        return JSONResponse({"status": "ready", "model_version": version})

    @app.get("/metrics")
    async def metrics() -> Response:
        server.refresh_gauges()
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/rollout")
    async def rollout() -> dict:
        """Routing state, the policy in force (by name and hash: no path of this machine), writes not landed yet."""
        return server.rollout.status() | {"policy": server.policy.model_dump(), "policy_name": server.policy_name,
                                          "policy_hash": server.policy_hash,
                                          "registry_writes_owed": server.registry_writes.pending}

    add_feedback_route(app, server, label_events)

    @app.post("/admin/reload")
    async def reload(request: Request) -> JSONResponse:
        authorize(request, settings.serve_admin_token)
        return JSONResponse(await server.reload() | {"rollout": server.rollout.status()["phase"]})

    @app.post("/admin/flush")
    async def flush(request: Request) -> JSONResponse:
        authorize(request, settings.serve_admin_token)
        rows = await asyncio.to_thread(server.request_log.flush)
        return JSONResponse({"rows_written": rows, "rows_logged": server.request_log.rows_logged})

    return app
