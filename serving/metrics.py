"""Prometheus metrics of one server, in a registry of its own (two apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("refit_requests", "Prediction requests by HTTP status.", ["status"], registry=r)
        self.errors = Counter("refit_request_errors", "Refused or failed prediction requests, by kind.",
                              ["kind"], registry=r)
        self.latency = Histogram("refit_request_latency_seconds", "Time to answer /predict, by answering version.",
                                 ["version"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_texts = Histogram("refit_batch_texts", "Texts per forward pass (micro-batching at work).",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.model_version = Gauge("refit_model_version", "Version loaded in each role (0: none).", ["role"],
                                   registry=r)
        self.predictions = Counter("refit_predictions", "Predictions by label and version.", ["label", "version"],
                                   registry=r)
        self.confidence_sum = Counter("refit_confidence_sum", "Sum of prediction confidences, by version.",
                                      ["version"], registry=r)
        self.mean_confidence = Gauge("refit_mean_confidence", "Mean confidence since the version was loaded.",
                                     ["version"], registry=r)
        self.cost_per_1k = Gauge("refit_inference_cost_per_1k_usd", "Inference cost per 1,000 predictions.",
                                 ["version"], registry=r)
        self.log_rows = Gauge("refit_request_log_rows", "Request-log rows written to the store.", registry=r)
        self.log_buffered = Gauge("refit_request_log_buffered", "Request-log rows not in the store yet: "
                                  "buffered, or spilled to local disk while it is down.", registry=r)
        self.rollbacks = Counter("refit_rollbacks", "Automatic rollbacks by this server.", registry=r)
        self.student_share = Gauge("refit_cascade_student_share", "Share of texts the cascade's student answered "
                                   "since the version was loaded.", ["version"], registry=r)
        self.tier_cpu_per_1k = Gauge("refit_cascade_cpu_seconds_per_1k", "Inference CPU-seconds per 1,000 texts "
                                     "answered, by cascade tier (student, champion, cascade).", ["version", "tier"],
                                     registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
