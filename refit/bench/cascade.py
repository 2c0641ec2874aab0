"""Cascade benchmark: the champion alone against the champion behind its student, side by side.

In its own ``REFIT_HOME`` (the CLI makes one):

1. ``refit bootstrap`` runs on the scenario (default ``clinc-shift``): champion
   v1 is trained and registered, and its cascade is built, calibrated and
   gated by the flow itself (``tasks/cascade.py``, ``refit/policies/cascade.yaml``);
2. the champion and the cascade are loaded as ``refit serve`` loads them
   (``registry.served.load_version``, ``registry.served.load_cascade``: merged,
   ONNX Runtime, one thread) into this one process;
3. both answer the same held-out texts: the scenario's quiet window (validation
   texts of the groups the champion knows; never trained on, never in the
   calibration split, never in the golden set that gated the cascade).
   Accuracy per text and per group slice, CPU-seconds per 1,000 predictions
   (batches, the two taking turns, fastest of three, ``tasks.evaluate``'s
   meter) and p95 of one-text requests (alternating text by text).

A cascade its gate refused is still measured here (from its run's student
and threshold), so the figures say how far it was from passing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

SCENARIO = "clinc-shift"
TARGETS = {"cost_ratio_max": 0.5, "accuracy_ratio_min": 0.99, "worst_slice_loss_max": 0.02}
LATENCY_TEXTS = 120

Progress = Callable[[str], None]


def _tiers(model_name: str, version: int, champion):
    """The version's cascade as served; if its gate refused it, rebuilt from its run to be measured anyway."""
    from pathlib import Path

    import mlflow

    from registry import versions
    from refit.runtime.cascade import ARTIFACT_DIR, RUN_TAG, THRESHOLD_TAG, CascadeModel, Student
    from registry.served import load_cascade

    served = load_cascade(model_name, version, champion)
    if served is not None:
        return served
    tags = versions.version_tags(model_name, version)
    directory = Path(mlflow.artifacts.download_artifacts(run_id=tags[RUN_TAG], artifact_path=ARTIFACT_DIR))
    return CascadeModel(champion, Student.load(directory, champion), float(tags[THRESHOLD_TAG]))


def measure(champion, cascade, frame: pd.DataFrame, min_slice_rows: int) -> dict:
    """Both ways of serving on ``frame`` (text, label, group): quality, cost and latency, side by side."""
    from refit.runtime.cascade import TierStats
    from tasks.cascade import figures
    from tasks.evaluate import cpu_seconds_per_1k, latency_ms

    texts = frame["text"].tolist()
    models = {"champion": champion, "cascade": cascade}
    cpu = cpu_seconds_per_1k(models, texts)
    latency = latency_ms(models, frame.sample(n=min(LATENCY_TEXTS, len(frame)), random_state=0)["text"].tolist())
    sets = {"heldout": frame}
    before = figures(champion, sets, cpu["champion"], latency["champion"][1])
    cascade.stats = TierStats()  # the tiers' CPU over the quality pass alone
    after = figures(cascade, sets, cpu["cascade"], latency["cascade"][1])
    losses = {g.split("/", 1)[1]: before.groups[g][1] - acc for g, (rows, acc) in after.groups.items()
              if rows >= min_slice_rows}
    worst = max(losses, key=losses.get) if losses else None
    tiers = cascade.stats.cpu_seconds_per_1k()
    return {
        "texts": len(texts),
        "champion": {"accuracy": round(before.accuracy["heldout"], 4), "cpu_seconds_per_1k": before.cpu_seconds_per_1k,
                     "p95_ms": before.latency_ms_p95},
        "cascade": {"accuracy": round(after.accuracy["heldout"], 4), "cpu_seconds_per_1k": after.cpu_seconds_per_1k,
                    "p95_ms": after.latency_ms_p95, "student_share": round(after.student_share["heldout"], 4),
                    "threshold": cascade.threshold,
                    "student_cpu_seconds_per_1k": round(tiers["student"], 4),
                    "escalated_cpu_seconds_per_1k": round(tiers["champion"], 4)},
        "cost_ratio": round(after.cpu_seconds_per_1k / before.cpu_seconds_per_1k, 4),
        "accuracy_ratio": round(after.accuracy["heldout"] / before.accuracy["heldout"], 4),
        "worst_slice_loss": round(losses[worst], 4) if worst else 0.0,
        "worst_slice": worst,
        "min_slice_rows": min_slice_rows,
        "slices": {g.split("/", 1)[1]: {"rows": rows, "champion": round(before.groups[g][1], 4),
                                         "cascade": round(acc, 4)} for g, (rows, acc) in after.groups.items()},
    }


def run_benchmark(scenario: str = SCENARIO, progress: Progress = lambda what: None, bootstrap=None,
                  http_seconds: float = 10.0) -> dict:
    """Bootstrap (which builds and gates the cascade as the flow does), then measure both ways of serving.

    ``bootstrap``: runs the bootstrap flow and returns its result (the CLI
    passes one that runs it in-process on its temporary Prefect API).
    ``http_seconds``: length of each HTTP load round (0 skips the HTTP comparison).
    """
    import torch

    from refit.scenario import build, load_scenario, load_source
    from refit.settings import Settings
    from registry import versions
    from registry.served import load_version
    from tasks.cascade import load_cascade_policy

    torch.set_num_threads(1)
    settings = Settings()
    progress(f"bootstrap on {scenario} in {settings.home_dir} (trains v1, builds and gates its cascade)")
    boot = bootstrap(scenario)
    version = int(boot["version"])
    tags = versions.version_tags(settings.model_name, version)
    spec, _ = load_scenario(scenario)
    data = build(spec, load_source(spec.source, settings.data_dir))
    frame = data.no_drift_window[["text", "label", "group"]].reset_index(drop=True)
    progress(f"measuring v{version} alone and as a cascade on {len(frame)} held-out texts")
    champion = load_version(settings.model_name, version, runtime=settings.serve_runtime, threads=1)
    cascade = _tiers(settings.model_name, version, champion)
    policy, _ = load_cascade_policy()
    result = measure(champion, cascade, frame, policy.min_slice_rows)
    result |= {"scenario": scenario, "version": version, "runtime": champion.runtime,
               "gate": {"verdict": tags.get("refit.cascade_verdict"), "reasons": tags.get("refit.cascade_reasons"),
                        "cost_ratio": tags.get("refit.cascade_cost_ratio"),
                        "accuracy_ratio": tags.get("refit.cascade_accuracy_ratio"),
                        "student_share": tags.get("refit.cascade_student_share"),
                        "worst_slice_loss": tags.get("refit.cascade_worst_slice_loss")},
               "golden_accuracy": boot.get("golden_accuracy"), "targets": TARGETS}
    result["targets_met"] = {
        "cost_ratio": result["cost_ratio"] <= TARGETS["cost_ratio_max"],
        "accuracy_ratio": result["accuracy_ratio"] >= TARGETS["accuracy_ratio_min"],
        "worst_slice_loss": result["worst_slice_loss"] <= TARGETS["worst_slice_loss_max"]}
    if http_seconds > 0:
        result["http"] = http_comparison(settings, version, frame["text"].tolist(), http_seconds, progress=progress)
    return result


def table(result: dict):
    from rich.table import Table

    out = Table(title=f"Cascade on {result['scenario']}: {result['texts']} held-out texts, one thread, side by side")
    for column in ("", "accuracy", "CPU-s / 1,000", "p95 ms", "student share"):
        out.add_column(column)
    champion, cascade = result["champion"], result["cascade"]
    out.add_row("champion alone", f"{champion['accuracy']:.4f}", f"{champion['cpu_seconds_per_1k']:.3f}",
                f"{champion['p95_ms']:.1f}", "-")
    out.add_row("cascade", f"{cascade['accuracy']:.4f}", f"{cascade['cpu_seconds_per_1k']:.3f}",
                f"{cascade['p95_ms']:.1f}", f"{cascade['student_share']:.3f}")
    out.add_row("ratio / loss", f"{result['accuracy_ratio']:.4f}", f"{result['cost_ratio']:.3f}", "",
                f"worst slice {result['worst_slice']}: {result['worst_slice_loss']:+.4f}")
    for mode, figures in result.get("http", {}).items():
        out.add_row(f"HTTP {mode} ({figures['runtime']})", "", "", "",
                    f"{figures['http_texts_per_s']:.0f} texts/s ({figures['vs_pipeline']:.2f}x pipeline)")
    return out


def summary(result: dict) -> dict:
    """The JSON line: the issue's keys first, then the detail."""
    keys = ("champion", "cascade", "worst_slice_loss", "cost_ratio", "accuracy_ratio", "targets_met", "http")
    return {k: result[k] for k in keys if k in result} | {k: v for k, v in result.items() if k not in keys}



def http_comparison(settings, version: int, texts: list[str], seconds: float = 10.0, rounds: int = 2,
                    concurrency: int = 8, progress: Progress = lambda what: None) -> dict:
    """Texts per second through ``refit serve`` over HTTP, with the cascade and with the champion alone,
    each against ``transformers.pipeline`` on the champion (``refit.bench.loadtest.compare_throughput``).

    The champion-alone server is the same version with its cascade verdict
    set aside for the run (tag restored after): a server loads a cascade only
    when the verdict says ``passed``.
    """
    import os
    import secrets
    import subprocess
    import sys
    import tempfile

    import httpx

    from registry import versions
    from serving.app import inference_threads
    from refit.runtime.cascade import VERDICT_TAG
    from refit.bench.children import free_port, wait_ready
    from refit.bench.loadtest import compare_throughput, stop_server

    name = settings.model_name
    adapter_dir = versions.download_adapter(name, version)
    verdict = versions.version_tags(name, version).get(VERDICT_TAG, "")
    out = {}
    try:
        for mode in ("cascade", "champion"):
            if mode == "champion":
                versions.set_tags(name, version, {VERDICT_TAG: f"set aside by refit bench cascade ({verdict})"})
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = os.environ | {"REFIT_SERVE_PORT": str(port), "REFIT_SERVE_URL": url, "REFIT_SERVE_POLL_SECONDS": "0",
                                "REFIT_SERVE_ADMIN_TOKEN": secrets.token_hex(16)}
            log_file = open(Path(tempfile.mkdtemp(prefix="refit-bench-cascade-")) / "serve.log", "w+")
            proc = subprocess.Popen([sys.executable, "-m", "refit.cli", "serve", "--port", str(port)], env=env,
                                    stdout=log_file, stderr=subprocess.STDOUT)
            try:
                wait_ready(url, proc)
                runtime = httpx.get(url + "/rollout", timeout=10).json()["runtimes"].get(str(version))
                progress(f"HTTP: {mode} ({runtime}) against transformers.pipeline, {rounds} rounds of {seconds:.0f} s")
                figures, _ = compare_throughput(url, adapter_dir, texts, settings.serve_batch_size,
                                                inference_threads(settings), concurrency, (1, 8), rounds=rounds,
                                                seconds=seconds, pipeline_texts=500, runtime=settings.serve_runtime)
            finally:
                stop_server(proc)
            out[mode] = {"runtime": runtime, "http_texts_per_s": figures["server_http_texts_per_s"],
                         "pipeline_texts_per_s": max(v for k, v in figures.items()
                                                     if k.startswith("pipeline_") and k.endswith("_texts_per_s")),
                         "vs_pipeline": figures["server_http_vs_best_pipeline"]}
    finally:
        if verdict:
            versions.set_tags(name, version, {VERDICT_TAG: verdict})
    return out
