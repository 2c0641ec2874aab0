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
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from refit.errors import RefitError
from refit.policy import file_hash
from refit.requestlog import new_request_id
from refit.secrets import mask_uri
from refit.settings import Settings
from refit.store import ObjectStore
from refit.runtime.cascade import served_by_champion
from registry.served import load_version, record_fallback, with_cascade
from serving.engine import Engine, Overloaded
from serving.guards import GuardVerdict, LiveStats, RolloutPolicy, load_rollout_policy
from serving.metrics import Metrics
from refit.runtime.served import ServedModel
from serving.requestlog import RequestLog
from serving.rollout import Rollout, Slot
from serving.schema import BadRequest, Limits, load_json, parse_texts, valid_unicode

log = logging.getLogger("refit.serving")
# Tag on a version that passed a canary and its watch on some server: a restarted server adopts it directly.
WATCHED_TAG = "refit.canary"


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
        # Registry writes this server owes, retried until they land: {what: (function, its arguments)}.
        self.owed: dict[str, tuple] = {}
        self._owed_lock = asyncio.Lock()
        self.experiment_id: str | None = None
        self._loading = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._threads_before = 0
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
        self._owe(f"rollback of v{verdict.new_version}", self._record_rollback, verdict, phase, restored)

    def _on_settle(self, version: int, baseline: int) -> None:
        """A version passed its canary and watch here: say so in the registry, so a restart need not redo it."""
        from registry import versions

        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._owe(f"canary of v{version}", versions.set_tags, self.model_name, version,
                  {WATCHED_TAG: f"passed against v{baseline} at {when}"})

    def _owe(self, what: str, function, *args) -> None:
        """Do a registry write now in the background; if it fails, keep it and retry until it lands."""
        self.owed[what] = (function, args)
        task = asyncio.get_running_loop().create_task(self._pay(what))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _pay(self, what: str) -> None:
        async with self._owed_lock:  # one try of each at a time: the retry loop and a fresh write never race
            if what not in self.owed:
                return
            function, args = self.owed[what]
            try:
                await asyncio.to_thread(function, *args)
            except Exception as exc:  # MLflow or the store down, the lock busy: keep it, retry later
                log.warning("%s not written to the registry yet (%s: %s); retrying every %g s", what,
                            type(exc).__name__, mask_uri(str(exc))[:300], self.settings.serve_registry_retry_seconds)
                return
            self.owed.pop(what, None)

    async def _pay_owed(self) -> None:
        for what in list(self.owed):
            await self._pay(what)

    def _record_rollback(self, verdict: GuardVerdict, phase: str, restored: int) -> None:
        """Move the aliases back and record why; raises on an outage (so it is retried), not on a conflict."""
        from registry.rollout import roll_back
        from registry.versions import LockBusy

        title = f"Automatic rollback of {self.model_name} v{verdict.new_version} ({phase})"
        try:
            result = roll_back(self.model_name, verdict.new_version, f"guard failed during {phase}: {verdict.summary}",
                               experiment_id=self.experiment_id, store=self.store,
                               source=f"refit serve ({phase} guard)", restore_to=restored,
                               guard_html=verdict.html(title), guard_markdown=f"# {title}\n\n{verdict.markdown()}",
                               guard_json=verdict.to_dict() | {"policy": self.policy.model_dump()})
            log.warning("rolled back in MLflow: %s", result)
        except LockBusy:
            raise  # a promotion holds the lock: try again later
        except RefitError as exc:  # the champion moved on meanwhile: nothing of ours to undo
            log.warning("rollback of v%d not recorded in MLflow: %s", verdict.new_version, exc)

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
                self._owe(f"cascade fallback of v{slot.version}", record_fallback, self.model_name, slot.version,
                          guard.tripped, self.experiment_id)

    async def start(self) -> None:
        import torch

        from registry.tracking import configure

        self._threads_before = torch.get_num_threads()  # restored on stop: tests run servers in-process
        torch.set_num_threads(inference_threads(self.settings, "torch"))  # torch answers on a failed export too

        self.experiment_id = await asyncio.to_thread(configure, self.settings)
        self.request_log.start()
        self.engine.start()
        self._tasks.append(asyncio.create_task(self._first_load(), name="first-load"))
        self._tasks.append(asyncio.create_task(
            self._every(self.policy.check_every_seconds, self._check_guards, "guard check"), name="guards"))
        self._tasks.append(asyncio.create_task(
            self._every(self.settings.serve_registry_retry_seconds, self._pay_owed, "registry retry"), name="owed"))
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
        if self.owed:
            log.error("stopping with registry writes not done: %s; the next server's canary repeats them",
                      ", ".join(self.owed))
        await self.engine.stop()
        await asyncio.to_thread(self.request_log.close)
        if self._threads_before:
            import torch

            torch.set_num_threads(self._threads_before)
        log.info("stopped: %d request-log rows written in %d parts", self.request_log.rows_logged,
                 self.request_log.parts_written)


def inference_threads(settings: Settings, runtime: str | None = None) -> int:
    """Threads for the forward pass on ``runtime`` (the configured one by default).

    ONNX Runtime: every available core (affinity, cgroup quota). Its pass is one call that leaves Python's lock
    to the event loop, and its idle threads sleep rather than spin.
    torch: one core is left to HTTP, JSON and the request log, since its
    eager pass takes the lock back between operations and its threads spin;
    on a busy machine every core in the pass halved throughput (measured in
    ``refit bench serve``). ``REFIT_SERVE_TORCH_THREADS`` overrides both.
    """
    from refit.procs import available_cpus

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

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        server.metrics.requests.labels(str(exc.status)).inc()
        server.metrics.errors.labels("unavailable" if exc.status == 503 else "bad_request").inc()
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        server.metrics.requests.labels("503").inc()
        server.metrics.errors.labels("overloaded").inc()
        return JSONResponse({"error": exc.message}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error(server, "request failed", "internal", exc)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        """{"texts": ["book a flight to Paris"]} -> a label, confidence and model version per text."""
        body = await _read_body(request, server.limits.max_body_bytes)
        texts = parse_texts(body, server.limits)
        try:
            return JSONResponse(await server.predict(texts))
        except (BadRequest, Overloaded):
            raise
        except Exception as exc:
            return _internal_error(server, "prediction failed", "inference", exc)

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
        """Routing state, the policy in force (by name and hash: no path of this machine) and owed registry writes."""
        return server.rollout.status() | {"policy": server.policy.model_dump(), "policy_name": server.policy_name,
                                          "policy_hash": server.policy_hash, "registry_writes_owed": sorted(server.owed)}

    quota = FeedbackQuota.from_env()

    @app.post("/feedback")
    async def feedback(request: Request) -> JSONResponse:
        """{"labels": [{"request_id": "...", "label": "..."}]} -> {"accepted", "waiting", "quarantined", "reasons"}."""
        return await _feedback(server, quota, request, label_events)

    @app.post("/admin/reload")
    async def reload(request: Request) -> JSONResponse:
        _authorize(request, settings.serve_admin_token)
        return JSONResponse(await server.reload() | {"rollout": server.rollout.status()["phase"]})

    @app.post("/admin/flush")
    async def flush(request: Request) -> JSONResponse:
        _authorize(request, settings.serve_admin_token)
        rows = await asyncio.to_thread(server.request_log.flush)
        return JSONResponse({"rows_written": rows, "rows_logged": server.request_log.rows_logged})

    return app


async def _feedback(server: Server, quota: FeedbackQuota, request: Request, events: LabelEvents) -> JSONResponse:
    """``POST /feedback``: labels from a team's labelling process.

    Bearer ``REFIT_SERVE_FEEDBACK_TOKEN``; refused while it is unset. Each
    label is checked as ``refit labels import`` checks it (``refit.labels``):
    a request id this server still buffers counts as served, one not visible
    yet (another replica's buffer) waits. Each caller (client address) may
    send ``REFIT_SERVE_FEEDBACK_LABELS_PER_MINUTE`` labels a minute; more is a
    429 with ``Retry-After``, since every label costs the server a look into
    the request log. Accepted labels are announced to the Prefect API
    (``LabelEvents``), so the update flow can check whether they suffice.
    """
    settings = server.settings
    _authorize(request, settings.serve_feedback_token, "/feedback", "REFIT_SERVE_FEEDBACK_TOKEN")
    rows = parse_feedback(await _read_body(request, server.limits.max_body_bytes))
    refused = quota.take(request.client.host if request.client else "unknown", len(rows))
    if refused is not None:
        server.metrics.requests.labels("429").inc()
        server.metrics.errors.labels("rate_limited").inc()
        return JSONResponse({"error": refused[0]}, status_code=429, headers={"Retry-After": str(refused[1])})
    from refit.labels import import_labels

    result = await asyncio.to_thread(import_labels, server.store, settings.model_name, rows, source="feedback",
                                     buffered_ids=server.request_log.pending_ids(),
                                     max_text_chars=settings.serve_max_text_chars)
    events.arrived(settings.model_name, result.accepted + result.earlier.kept)
    return JSONResponse(result.to_dict())


def _internal_error(server: Server, what: str, kind: str, exc: Exception) -> JSONResponse:
    """A 500 that names an error id to find in the server log, and nothing of the exception itself."""
    error_id = uuid.uuid4().hex[:12]
    log.error("%s (error id %s)", what, error_id, exc_info=exc)
    server.metrics.requests.labels("500").inc()
    server.metrics.errors.labels(kind).inc()
    return JSONResponse({"error": f"{what}: internal error (error id {error_id}; the server log has the details)"},
                        status_code=500)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` bytes (never read whole into memory)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body is {int(declared):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _authorize(request: Request, token, what: str = "admin endpoints",
               setting: str = "REFIT_SERVE_ADMIN_TOKEN") -> None:
    if token is None:
        raise BadRequest(403, f"{what}: disabled until {setting} is set")
    given = request.headers.get("authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise BadRequest(401, f"{what}: send the header 'Authorization: Bearer <{setting}>'")


LABELS_EVENT = "refit.labels.arrived"


class LabelEvents:
    """``refit.labels.arrived`` to the Prefect API after ``/feedback`` kept labels: at most one per model a minute.

    The update deployment starts on this event and checks whether the open
    episode's labels suffice; a flood of events would start a flood of flow
    runs, so this process sends at most one per model every ``every``
    seconds. Labels kept in between are not lost: they are announced
    together, in one event at the end of that interval (and when the server
    stops). The event is posted over HTTP (``POST <PREFECT_API_URL>/events``)
    from a thread: serving imports no Prefect, and the event loop never waits
    on the API. Without ``PREFECT_API_URL`` nothing is sent; an API that does
    not answer costs a warning in the log, never the request.
    """

    EVERY_SECONDS = 60.0
    TIMEOUT_SECONDS = 10.0

    def __init__(self, api_url: str | None, every: float = EVERY_SECONDS, send=None, clock=time.monotonic):
        self.api_url = api_url.rstrip("/") if api_url else None
        self.every = every
        self._send = send or self._post
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # model -> when its last event went out
        self._owed: dict[str, int] = {}  # model -> labels kept since, not announced yet
        self._timers: dict[str, threading.Timer] = {}

    @classmethod
    def from_env(cls) -> LabelEvents:
        import os

        return cls(os.environ.get("PREFECT_API_URL", "").strip() or None)

    def arrived(self, model_name: str, labels: int) -> None:
        """``labels`` were kept for ``model_name``: announce them now, or with the next event if one went out
        less than ``every`` seconds ago. Returns at once."""
        if not self.api_url or labels <= 0:
            return
        with self._lock:
            self._owed[model_name] = self._owed.get(model_name, 0) + labels
            if model_name in self._timers:  # an event is due: it carries these labels too
                return
            wait = self._last.get(model_name, -self.every) + self.every - self._clock()
            timer = threading.Timer(max(0.0, wait), self._flush, args=(model_name,))
            timer.daemon = True
            self._timers[model_name] = timer
        timer.start()

    def _flush(self, model_name: str) -> None:
        with self._lock:
            self._timers.pop(model_name, None)
            labels = self._owed.pop(model_name, 0)
            if labels:
                self._last[model_name] = self._clock()
        if labels:
            self._deliver(model_name, labels)

    def _deliver(self, model_name: str, labels: int) -> None:
        try:
            self._send(model_name, labels)
        except Exception as exc:  # noqa: BLE001 - urllib's and the network's errors alike: the labels are kept
            log.warning("%s for %s (%d labels) not sent to the Prefect API at %s: %s: %s", LABELS_EVENT,
                        model_name, labels, mask_uri(self.api_url), type(exc).__name__, exc)

    def stop(self) -> None:
        """Announce what is still owed, now: a stopping server sends no later event."""
        with self._lock:
            timers, self._timers = list(self._timers.values()), {}
            owed, self._owed = self._owed, {}
        for timer in timers:
            timer.cancel()
        for model_name, labels in owed.items():
            self._deliver(model_name, labels)

    def _post(self, model_name: str, labels: int) -> None:
        import base64
        import json
        import os
        import urllib.request

        event = {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(), "event": LABELS_EVENT,
                 "resource": {"prefect.resource.id": f"refit.model.{model_name}"}, "related": [],
                 "payload": {"model_name": model_name, "labels": labels}}
        headers = {"Content-Type": "application/json"}
        if os.environ.get("PREFECT_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['PREFECT_API_KEY']}"
        elif os.environ.get("PREFECT_API_AUTH_STRING"):
            token = base64.b64encode(os.environ["PREFECT_API_AUTH_STRING"].encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        request = urllib.request.Request(f"{self.api_url}/events", data=json.dumps([event]).encode(),
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.TIMEOUT_SECONDS):  # a 4xx or 5xx raises HTTPError
            pass


class FeedbackQuota:
    """Labels per caller per minute on /feedback: a token bucket per client address, a minute's worth deep."""

    ENV = "REFIT_SERVE_FEEDBACK_LABELS_PER_MINUTE"
    DEFAULT = 6000

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (labels left, when counted)
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> FeedbackQuota:
        import os

        value = os.environ.get(cls.ENV, "").strip()
        if value and not (value.isdigit() and int(value) > 0):
            raise RefitError(f"{cls.ENV} must be a whole number of labels above 0, not {value!r}")
        return cls(int(value) if value else cls.DEFAULT)

    def take(self, caller: str, labels: int) -> tuple[str, int] | None:
        """None if ``caller`` may send ``labels`` now (they are counted), else (the refusal, seconds to wait)."""
        if labels > self.per_minute:
            return (f"/feedback: {labels:,} labels in one call; a caller may send at most {self.per_minute:,} a "
                    f"minute ({self.ENV}): split the batch", 60)
        now = time.monotonic()
        with self._lock:
            left, then = self._buckets.get(caller, (float(self.per_minute), now))
            left = min(float(self.per_minute), left + (now - then) * self.per_minute / 60)
            if left < labels:
                self._buckets[caller] = (left, now)
                wait = max(1, round((labels - left) * 60 / self.per_minute + 0.5))
                return (f"/feedback: rate limit of {self.per_minute:,} labels a minute per caller ({self.ENV}) "
                        f"reached by {caller}; retry in {wait} s", wait)
            self._buckets[caller] = (left - labels, now)
            if len(self._buckets) > 10_000:  # forget callers whose bucket has refilled
                full = [c for c, (_, t) in self._buckets.items() if now - t > 60]
                for c in full:
                    self._buckets.pop(c, None)
        return None


def parse_feedback(body: bytes):
    """The /feedback body as a frame of labels; a malformed body is a 4xx naming the problem."""
    import pandas as pd

    data = load_json(body)
    if not isinstance(data, dict) or set(data) != {"labels"} or not isinstance(data["labels"], list):
        raise BadRequest(422, 'body must be {"labels": [{"request_id": "...", "label": "..."}, ...]}')
    if not data["labels"]:
        raise BadRequest(422, "labels is empty")
    allowed = {"request_id", "label", "text"}
    for i, item in enumerate(data["labels"]):
        if not isinstance(item, dict) or not set(item) <= allowed or "label" not in item:
            raise BadRequest(422, f"labels[{i}] must be an object with label and request_id (or text)")
        if not all(v is None or isinstance(v, str) for v in item.values()):
            raise BadRequest(422, f"labels[{i}]: request_id, label and text must be strings")
        if not all(v is None or valid_unicode(v) for v in item.values()):
            raise BadRequest(422, f"labels[{i}]: not valid Unicode (a lone surrogate escape such as \\ud800)")
    frame = pd.DataFrame(data["labels"])
    for column in ("request_id", "text"):
        if column not in frame.columns:
            frame[column] = None
    return frame
