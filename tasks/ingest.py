"""Ingest: traffic in, labelled examples out.

Replaying a window scores it with the champion and writes it to the request
log exactly as serving would; assembling labelled data joins delayed labels
to the requests they belong to.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from refit import modeling, requestlog
from refit.errors import RefitError
from refit.store import ObjectStore
from tasks.validate import check_label_mix, validate_labels
from tasks.retry import RETRY


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


@task(name="replay-traffic", cache_policy=NO_CACHE, **RETRY)
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


@task(name="labelled-window", cache_policy=NO_CACHE, **RETRY)
def labelled_window(store: ObjectStore, model_name: str, start: datetime, end: datetime,
                    known_labels: list[str] | None = None, max_label_mix_shift: float | None = None,
                    min_rows_for_mix: int = 50) -> pd.DataFrame:
    """Texts of the window's requests that have a delayed label, with that label.

    With ``known_labels``, label feedback the model cannot learn from (unknown
    or empty label, no request id) goes to quarantine with its reason first.
    With ``max_label_mix_shift``, the labels' mix is compared with what the
    model predicted for the same requests (total variation); a batch beyond it
    is quarantined whole and refused (a broken labelling job or poisoning).
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
    if max_label_mix_shift is not None and len(joined) >= min_rows_for_mix and "predicted_label" in joined:
        check = check_label_mix(joined["predicted_label"], joined["label"], max_label_mix_shift)
        if check.suspect:
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%S.%f")
            uri = store.put_parquet(
                f"quarantine/model={model_name}/labels/{stamp}-{uuid.uuid4().hex[:8]}-batch.parquet",
                joined.astype(str).assign(reason=check.reason))
            raise RefitError(f"label batch rejected: {check.reason} of the model's predictions for the same "
                             f"{len(joined)} requests; quarantined at {uri}")
    return joined[["text", "label"]].reset_index(drop=True)


@contextmanager
def fetched_labelled_file(uri: str, settings) -> Iterator[Path]:
    """A local path for ``uri``: a path, ``file://...``, or ``s3://bucket/key`` (fetched with boto3).

    An ``s3://`` object is read through the configured endpoint (MinIO, moto
    or AWS) into a temporary file with the same suffix, so the loader can tell
    CSV from Parquet from JSON; the copy is deleted when the block ends.
    """
    import shutil
    import tempfile
    from urllib.parse import unquote, urlparse

    from refit.store import S3Store

    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        store = S3Store(parsed.netloc, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        try:
            data = store.get_bytes(parsed.path.lstrip("/"))
        except KeyError:
            raise RefitError(f"hotfix file {uri} does not exist") from None
        except Exception as exc:  # botocore: no such bucket, no credentials, endpoint down
            raise RefitError(f"hotfix file {uri} could not be read: {exc}") from None
        directory = Path(tempfile.mkdtemp(prefix="refit-hotfix-"))
        try:
            local = directory / Path(parsed.path).name
            local.write_bytes(data)
            yield local
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    elif parsed.scheme == "file":
        yield Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise RefitError(f"hotfix file {uri}: only local paths, file:// and s3:// URIs are read")
    else:
        yield Path(uri)


def read_labelled_file(path: str, known_labels: list[str], settings=None) -> pd.DataFrame:
    """A hand-supplied labelled file (the hotfix path): text and label columns; a path or a URI."""
    from refit.data import load_table
    from refit.settings import Settings

    with fetched_labelled_file(path, settings or Settings()) as local:
        frame = load_table(local)[["text", "label"]]
    if frame.empty:
        raise RefitError(f"hotfix file {path} has no rows")
    unknown = sorted(set(frame["label"]) - set(known_labels))
    if unknown:
        raise RefitError(f"hotfix file {path} has labels the model does not know: {unknown[:5]}")
    return frame
