"""Ingest: traffic in, labelled examples out.

Replaying a window scores it with the champion and writes it to the request
log exactly as serving would; assembling labelled data joins delayed labels
to the requests they belong to.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from refit import modeling, requestlog
from refit.data import text_keys
from refit.labels import check_source, read_examples, resolve_pending
from refit.errors import RefitError
from refit.store import ObjectStore
from tasks.validate import check_label_mix, validate_labels
from tasks.retry import RETRY


def score_traffic(model, tokenizer, texts: list[str], version: int, start: datetime, end: datetime,
                  seed: int = 0) -> pd.DataFrame:
    """Requests as serving would log them, timestamps spread over ``[start, end)``.

    ``model``: a torch model with its ``tokenizer``, or (``tokenizer`` None)
    what ``refit serve`` answers with: a served model, or its gated cascade,
    whose tier per text is logged in ``served_by`` as the server logs it.
    """
    from refit.runtime.cascade import CHAMPION, CascadeModel

    tiers = [CHAMPION] * len(texts)
    if tokenizer is not None:
        labels, confidence = modeling.predict(model, tokenizer, texts)
    elif isinstance(model, CascadeModel):
        labels, confidence, tiers = model.predict_tiers(texts)
    else:
        labels, confidence = model.predict(texts)
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.uniform(0, (end - start).total_seconds(), len(texts)))
    times = pd.Timestamp(start) + pd.to_timedelta(offsets, unit="s")  # each id carries its request's time
    return pd.DataFrame({
        "request_id": [requestlog.new_request_id(t) for t in times],
        "timestamp": times,
        "text": texts,
        "predicted_label": labels,
        "confidence": confidence.astype(float),
        "model_version": str(version),
        "served_by": tiers,
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


def _stamp() -> str:
    return f"{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H%M%S.%f')}-{uuid.uuid4().hex[:8]}"


@task(name="labelled-window", cache_policy=NO_CACHE, **RETRY)
def labelled_window(store: ObjectStore, model_name: str, start: datetime, end: datetime,
                    known_labels: list[str] | None = None, max_label_mix_shift: float | None = None,
                    min_rows_for_mix: int = 50) -> pd.DataFrame:
    """Texts of the window's requests that have a delayed label, with that label, the request's time and id,
    plus the examples imported (``refit labels import`` with text, label) during the window.

    Labels that waited for their request (another replica had not flushed it)
    are joined first, where the request has arrived since. Label feedback
    that cannot be used (no request id, empty label) goes to quarantine with
    its reason first. Labels the model does not know are kept: the update's
    new-label policy decides on them (``admit_new_labels``). With
    ``max_label_mix_shift``, the mix of the labels the model knows is compared
    with what it predicted for the same requests (total variation); a batch
    beyond it is quarantined whole and refused (a broken labelling job or
    poisoning). Examples get the same guard: they were never served, so their
    mix is compared with what the model predicted for the window's traffic.
    """
    resolve_pending(store, model_name)
    served = requestlog.read_inference(store, model_name, start, end)
    labels = requestlog.read_labels(store, model_name, since=start.date())
    if len(labels):
        labels, rejected = validate_labels(labels)
        if len(rejected):
            store.put_parquet(f"quarantine/model={model_name}/labels/{_stamp()}.parquet", rejected.astype(str))
    joined = served.merge(labels.drop_duplicates("request_id", keep="last"), on="request_id", how="inner")
    joined = joined[~joined["request_id"].isin(_ids_under(store, f"quarantine/model={model_name}/labels/", "-batch"))]
    judged = joined[joined["label"].isin(known_labels)] if known_labels is not None else joined
    # Requests refit asked labels for were picked for being unsure: their label mix is not the traffic's.
    judged = judged[~judged["request_id"].isin(_ids_under(store, f"labels/model={model_name}/requested/"))]
    if max_label_mix_shift is not None and len(judged) >= min_rows_for_mix and "predicted_label" in judged:
        check = check_label_mix(judged["predicted_label"], judged["label"], max_label_mix_shift)
        if check.suspect:
            uri = store.put_parquet(f"quarantine/model={model_name}/labels/{_stamp()}-batch.parquet",
                                    joined.astype(str).assign(reason=check.reason))
            raise RefitError(f"label batch rejected: {check.reason} of the model's predictions for the same "
                             f"{len(judged)} requests; quarantined at {uri}")
    columns = ["text", "label"] + (["timestamp"] if "timestamp" in joined.columns else [])
    examples = read_examples(store, model_name, start, end)  # imported text,label rows, never served
    if max_label_mix_shift is not None and len(examples):
        _guard_examples(store, model_name, served, examples, known_labels, max_label_mix_shift, min_rows_for_mix)
    served_rows = joined[columns + ["request_id"]]
    return pd.concat([served_rows, examples[columns]], ignore_index=True) if len(examples) else \
        served_rows.reset_index(drop=True)


def _ids_under(store: ObjectStore, prefix: str, marker: str = "") -> set[str]:
    """Request ids in the parquet files under ``prefix`` whose name holds ``marker``: batches refused whole
    (kept out of every later join, so one bad batch never stalls an episode), or requests refit asked about."""
    keys = [k for k in store.list(prefix) if marker in k.rsplit("/", 1)[-1]]
    ids: set[str] = set()
    for key in keys:
        frame = store.get_parquet(key)
        if "request_id" in frame.columns:
            ids |= set(frame["request_id"].astype(str))
    return ids


def _guard_examples(store: ObjectStore, model_name: str, served: pd.DataFrame, examples: pd.DataFrame,
                    known_labels: list[str] | None, max_shift: float, min_rows: int) -> None:
    """The label-mix guard for examples: their mix against the model's predictions on the window's traffic.

    Judged once both sides have ``min_rows`` rows of labels the model knows;
    beyond ``max_shift`` the examples are quarantined whole and the batch is
    refused, as served rows are.

    Raises:
        RefitError: the examples' mix moved too far.
    """
    judged = examples[examples["label"].isin(known_labels)] if known_labels is not None else examples
    predicted = served["predicted_label"] if "predicted_label" in served else pd.Series(dtype=object)
    if known_labels is not None:
        predicted = predicted[predicted.isin(known_labels)]
    if len(judged) < min_rows or len(predicted) < min_rows:
        return
    check = check_label_mix(predicted, judged["label"], max_shift)
    if check.suspect:
        uri = store.put_parquet(f"quarantine/model={model_name}/labels/{_stamp()}-examples.parquet",
                                examples.astype(str).assign(reason=check.reason))
        raise RefitError(f"example batch rejected: {check.reason} of the model's predictions on the window's "
                         f"{len(predicted)} requests; quarantined at {uri}")


def pending_prefix(model_name: str) -> str:
    return f"quarantine/model={model_name}/new-labels/"


@dataclass(frozen=True)
class Admitted:
    """An update's labelled rows after the new-label policy.

    ``rows``: rows of known labels plus every row of a new label that reached
    its minimum (this batch's and those waiting from earlier batches).
    ``learned``: the new labels admitted. ``waiting``: this batch's rows of
    new labels still below the minimum, now in quarantine with the reason.
    """

    rows: pd.DataFrame
    learned: list[str]
    waiting: int
    from_earlier: int
    reasons: dict[str, str]


def admit_new_labels(store: ObjectStore, model_name: str, rows: pd.DataFrame, known_labels: list[str],
                     min_examples: int) -> Admitted:
    """Apply the new-label policy to an update's labelled rows.

    A label the champion does not know is learned (its head grows) once at
    least ``min_examples`` distinct texts of it have arrived, counting rows
    that waited in quarantine from earlier batches. Rows of a label below the
    minimum go to quarantine (``quarantine/model=<name>/new-labels/``) with
    the reason, and count toward it next time. Rows of a label the model has
    since learned are no longer waiting. Rows in = rows kept + rows waiting.
    """
    known = set(known_labels)
    unknown = rows[~rows["label"].isin(known)]
    waiting = store.read_parquet_prefix(pending_prefix(model_name))
    if len(waiting):
        waiting = waiting[~waiting["label"].isin(known)].drop(columns=["reason"], errors="ignore")
    earlier = waiting[~text_keys(waiting["text"]).isin(set(text_keys(unknown["text"])))] if len(waiting) else waiting
    both = pd.concat([unknown, earlier], ignore_index=True) if len(earlier) else unknown
    counts = both.drop_duplicates(subset=["text"])["label"].value_counts()
    ready = sorted(str(label) for label, n in counts.items() if n >= min_examples)
    short = {str(label): (f"new label {label!r}: {n} row(s) so far, fewer than min_examples_per_new_label="
                          f"{min_examples}; learned once enough arrive") for label, n in counts.items()
             if n < min_examples}
    below = unknown[~unknown["label"].isin(ready)]
    if len(below):
        store.put_parquet(pending_prefix(model_name) + f"{_stamp()}.parquet",
                          below.astype({"text": str, "label": str}).assign(reason=below["label"].map(short)))
    picked = [rows[rows["label"].isin(known)], unknown[unknown["label"].isin(ready)]]
    from_earlier = earlier[earlier["label"].isin(ready)] if len(earlier) else earlier
    if len(from_earlier):
        picked.append(from_earlier[[c for c in rows.columns if c in from_earlier.columns]])
    kept = pd.concat(picked, ignore_index=True)
    return Admitted(kept, ready, len(below), len(from_earlier), short)


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


def read_labelled_file(path: str, settings=None) -> pd.DataFrame:
    """A hand-supplied labelled file (the hotfix path): text and label columns; a path or a URI.

    Labels the model does not know are kept: the update's new-label policy
    decides on them, as for delayed labels.
    """
    from refit.data import load_table
    from refit.settings import Settings

    settings = settings or Settings()
    check_source(path, settings.allowed_label_sources(on_server=on_prefect_server()))
    with fetched_labelled_file(path, settings) as local:
        frame = load_table(local)[["text", "label"]]
    if frame.empty:
        raise RefitError(f"hotfix file {path} has no rows")
    blank = frame["label"].isna() | (frame["label"].astype(str).str.strip() == "")
    if blank.any():
        raise RefitError(f"hotfix file {path}: {int(blank.sum())} row(s) have an empty label "
                         f"(first at row {int(blank.to_numpy().argmax()) + 1})")
    cap = settings.serve_max_text_chars
    long = frame["text"].map(lambda v: isinstance(v, str) and len(v) > cap)
    if long.any():
        raise RefitError(f"hotfix file {path}: {int(long.sum())} row(s) have a text over {cap:,} characters, the "
                         f"longest text the server answers (REFIT_SERVE_MAX_TEXT_CHARS; first at row "
                         f"{int(long.to_numpy().argmax()) + 1})")
    return frame.assign(label=frame["label"].astype(str))


def on_prefect_server() -> bool:
    """Whether flows talk to a Prefect server (``PREFECT_API_URL``), not a temporary API of their own."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)
