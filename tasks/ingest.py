"""Ingest: traffic in, labelled examples out.

Replaying a window scores it with the champion and writes it to the request
log exactly as serving would; assembling labelled data joins delayed labels
to the requests they belong to.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from refit import modeling, requestlog
from refit.errors import RefitError
from refit.store import ObjectStore
from tasks.validate import validate_labels


def score_traffic(model, tokenizer, texts: list[str], version: int, start: datetime, end: datetime,
                  seed: int = 0) -> pd.DataFrame:
    """Requests as serving would log them, timestamps spread over ``[start, end)``."""
    labels, confidence = modeling.predict(model, tokenizer, texts)
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.uniform(0, (end - start).total_seconds(), len(texts)))
    return pd.DataFrame({
        "request_id": [uuid.uuid4().hex for _ in texts],
        "timestamp": pd.Timestamp(start) + pd.to_timedelta(offsets, unit="s"),
        "text": texts,
        "predicted_label": labels,
        "confidence": confidence.astype(float),
        "model_version": str(version),
    })


@task(name="replay-traffic", cache_policy=NO_CACHE)
def replay_traffic(store: ObjectStore, model_name: str, model, tokenizer, version: int, window: pd.DataFrame,
                   start: datetime, end: datetime, labelled_share: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Score ``window`` with the champion, log it as served, and file delayed labels for a share of it."""
    served = score_traffic(model, tokenizer, window["text"].tolist(), version, start, end, seed)
    requestlog.write_inference(store, model_name, served)
    if labelled_share > 0:
        picked = np.random.default_rng(seed).random(len(served)) < labelled_share
        labels = pd.DataFrame({"request_id": served["request_id"][picked],
                               "label": window["label"].to_numpy()[picked], "source": "delayed-feedback"})
        requestlog.write_labels(store, model_name, labels)
    return served


@task(name="labelled-window", cache_policy=NO_CACHE)
def labelled_window(store: ObjectStore, model_name: str, start: datetime, end: datetime,
                    known_labels: list[str] | None = None) -> pd.DataFrame:
    """Texts of the window's requests that have a delayed label, with that label.

    With ``known_labels``, label feedback the model cannot learn from (unknown
    or empty label, no request id) goes to quarantine with its reason first.
    """
    served = requestlog.read_inference(store, model_name, start, end)
    labels = requestlog.read_labels(store, model_name)
    if known_labels is not None and len(labels):
        labels, rejected = validate_labels(labels, known_labels)
        if len(rejected):
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%S.%f")
            store.put_parquet(f"quarantine/model={model_name}/labels/{stamp}-{uuid.uuid4().hex[:8]}.parquet",
                              rejected.astype(str))
    joined = served.merge(labels.drop_duplicates("request_id", keep="last"), on="request_id", how="inner")
    return joined[["text", "label"]].reset_index(drop=True)


def read_labelled_file(path: str, known_labels: list[str]) -> pd.DataFrame:
    """A hand-supplied labelled file (the hotfix path): text and label columns."""
    from pathlib import Path

    from refit.data import load_table

    frame = load_table(Path(path))[["text", "label"]]
    if frame.empty:
        raise RefitError(f"hotfix file {path} has no rows")
    unknown = sorted(set(frame["label"]) - set(known_labels))
    if unknown:
        raise RefitError(f"hotfix file {path} has labels the model does not know: {unknown[:5]}")
    return frame
