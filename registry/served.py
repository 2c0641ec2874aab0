"""A registered version as the server loads it: its adapter from MLflow, merged, and its gated cascade.

The runtime (``refit.runtime``) knows how to serve a version's files; this is
where a version's number becomes those files (``download_adapter``) and its
tags decide whether the cascade serves (``refit.cascade_verdict``), and where
the live guard's fallback is recorded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from refit.runtime.cascade import (ARTIFACT_DIR, FALLBACK_TAG, GUARD_TAG, RUN_TAG, SHARE_TAG, THRESHOLD_TAG,
                                   VERDICT_TAG, CascadeModel, ShareGuard, Student)
from refit.runtime.served import ServedModel, from_adapter
from registry import versions

log = logging.getLogger("refit.serving")


def load_version(model_name: str, version: int, batch_size: int = 32, tokenizer=None, runtime: str = "onnx",
                 threads: int = 1) -> ServedModel:
    """Download a registered version's adapter and make it ready to serve."""
    return from_adapter(versions.download_adapter(model_name, version), version, batch_size, tokenizer, runtime,
                        threads)


def load_cascade(model_name: str, version: int, champion) -> CascadeModel | None:
    """The version's gated cascade around ``champion``, or None (no cascade, or one its gate refused).

    Reads the version's tags: only ``refit.cascade_verdict=passed`` loads,
    with the threshold recorded there and the student stored in the cascade
    run (``refit.cascade_run_id``).
    """
    import mlflow

    tags = versions.version_tags(model_name, version)
    verdict = tags.get(VERDICT_TAG)
    if verdict != "passed":
        if verdict:
            log.info("v%d: cascade %s (%s); the champion serves alone", version, verdict,
                     tags.get("refit.cascade_reasons", "")[:300])
        return None
    if tags.get(FALLBACK_TAG):
        log.info("v%d: the cascade's live guard tripped (%s); the champion serves alone", version,
                 tags[FALLBACK_TAG][:300])
        return None
    directory = mlflow.artifacts.download_artifacts(run_id=tags[RUN_TAG], artifact_path=ARTIFACT_DIR)
    guard = json.loads(tags.get(GUARD_TAG, "null"))
    model = CascadeModel(champion, Student.load(Path(directory), champion), float(tags[THRESHOLD_TAG]),
                         guard=ShareGuard(float(tags[SHARE_TAG]), guard["max_share_drop"], guard["guard_min_texts"])
                         if guard and SHARE_TAG in tags else None)
    if tuple(model.student.labels) != tuple(champion.labels):
        log.warning("v%d: the cascade's student knows other labels than the champion; the champion serves alone",
                    version)
        return None
    log.info("v%d: serving as a cascade (student threshold %.4f, gated student share %s)", version,
             model.threshold, tags.get(SHARE_TAG, "?"))
    return model


def with_cascade(model_name: str, version: int, champion):
    """What the server answers with for a version: its gated cascade, else the champion alone.

    A cascade that cannot be loaded (its run's artifacts gone, say) is not a
    reason to refuse the version: the champion serves alone, with a warning.
    """
    try:
        return load_cascade(model_name, version, champion) or champion
    except Exception as exc:  # noqa: BLE001 - any registry or file problem: the champion alone
        log.warning("v%d: cascade not loaded (%s: %s); the champion serves alone", version, type(exc).__name__, exc)
        return champion


def record_fallback(model_name: str, version: int, reason: str, experiment_id: str | None,
                    source: str = "refit serve") -> None:
    """The live guard tripped: tag the version (the cascade is not loaded again) and keep a run with the reason."""
    import mlflow

    from registry.tracking import RUN_TYPE

    with mlflow.start_run(experiment_id=experiment_id, run_name=f"cascade fallback v{version}",
                          tags={RUN_TYPE: "cascade-fallback", "refit.model": model_name,
                                "refit.version": str(version), "refit.source": source}):
        mlflow.log_text(json.dumps({"model_name": model_name, "version": version, "reason": reason}, indent=2),
                        "cascade_fallback.json")
    versions.set_tags(model_name, version, {FALLBACK_TAG: reason[:5000]})
