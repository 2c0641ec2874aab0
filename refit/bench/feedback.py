"""Feedback benchmark: ``POST /feedback`` over real HTTP against a month of request log.

In its own ``REFIT_HOME`` (the CLI makes one, or reuses ``--home``):

1. the local store is filled with ``requests`` logged requests spread over
   ``days`` days ending now, in the request log's own layout and format
   (``inference/model=<name>/date=YYYY-MM-DD/part-*.parquet``, parts of
   ``PART_ROWS`` rows as a busy server flushes them, ids as ``refit serve``
   makes them), CLINC150 texts with their label as the predicted label.
   A second run on the same home reuses what the first wrote
   (``bench-feedback.json`` in the home says what it was), unless its days
   have left the label lookback;
2. ``refit serve`` starts as a subprocess on 127.0.0.1. No champion is
   registered: ``/predict`` answers 503, while ``/feedback`` needs no model
   and answers as in production;
3. one caller posts ``calls`` calls of ``labels_per_call`` labels: ids
   sampled over all the days (never labelled before), plus
   ``unlogged_per_call`` ids of requests that another replica answered and
   has not flushed yet. That replica flushes every ``flush_every`` calls
   (its rows written to the store as its request log writes them), and
   before the last call, so every waiting label can be joined by a later
   call;
4. afterwards every posted label is looked for in the store: kept (joined to
   its request, with the label sent), waiting, or quarantined. A label in
   none of them is lost; a kept label whose request's logged label differs
   is a join error.

Latency is each call's, end to end, as the caller sees it.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from refit.bench.children import free_port
from refit.bench.loadtest import stop_server
from refit.errors import RefitError

MODEL = "feedback-bench"
PART_ROWS = 2000
MANIFEST = "bench-feedback.json"
TARGET_P95_MS = 1000.0

Progress = Callable[[str], None]


def _ids(ms: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Request ids in ``refit.requestlog.new_request_id``'s layout for the times ``ms``, from a seeded generator."""
    rand_a = rng.integers(0, 1 << 12, len(ms))
    rand_b = rng.integers(0, 1 << 62, len(ms), dtype=np.int64)
    return [f"{m:012x}7{a:03x}{(2 << 62 | b):016x}" for m, a, b in zip(ms.tolist(), rand_a.tolist(), rand_b.tolist())]


def _part(ids: list[str], ms: np.ndarray, texts: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> bytes:
    """One request-log part, the columns and types ``refit.requestlog.write_inference`` writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(ids)
    table = pa.table({
        "request_id": pa.array(ids, pa.string()),
        "timestamp": pa.array(ms.astype("datetime64[ms]").astype("datetime64[ns]"), pa.timestamp("ns", tz="UTC")),
        "text": pa.array(texts, pa.string()),
        "predicted_label": pa.array(labels, pa.string()),
        "confidence": pa.array(rng.uniform(0.5, 1.0, n)),
        "model_version": pa.array(["1"] * n, pa.string()),
        "served_by": pa.array(["champion"] * n, pa.string()),
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def fill_store(store, data_dir: Path, requests: int, days: int, now: datetime, seed: int = 0,
               progress: Progress = lambda what: None) -> dict:
    """Write ``requests`` logged requests over the ``days`` days up to ``now``; returns what was written."""
    from refit.data import load_clinc150

    frame = load_clinc150(data_dir)
    texts, labels = frame["text"].to_numpy(dtype=object), frame["label"].to_numpy(dtype=object)
    rng = np.random.default_rng(seed)
    first = now.date() - timedelta(days=days - 1)
    per_day = np.full(days, requests // days)
    per_day[: requests % days] += 1
    written = 0
    for offset, count in enumerate(per_day.tolist()):
        day = first + timedelta(days=offset)
        start = int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp() * 1000)
        stop = min(start + 86_400_000, int(now.timestamp() * 1000) - 60_000)  # today: only what was answered
        ms = np.sort(rng.integers(start, max(start + 1, stop), count))
        ids, pick = _ids(ms, rng), rng.integers(0, len(texts), count)
        for lo in range(0, count, PART_ROWS):
            hi = min(count, lo + PART_ROWS)
            key = f"inference/model={MODEL}/date={day.isoformat()}/part-{int(ms[hi - 1])}-{rng.bytes(4).hex()}.parquet"
            store.put_bytes(key, _part(ids[lo:hi], ms[lo:hi], texts[pick[lo:hi]], labels[pick[lo:hi]], rng))
        written += count
        progress(f"filled {day}: {written:,} of {requests:,} requests")
    return {"requests": requests, "days": days, "first_day": first.isoformat(), "last_day": now.date().isoformat(),
            "seed": seed, "part_rows": PART_ROWS, "model_name": MODEL}


def _filled(home: Path, store, data_dir: Path, requests: int, days: int, now: datetime, seed: int,
            progress: Progress) -> tuple[dict, bool]:
    """The store's month of requests: reused if this home holds the same one, still inside the lookback."""
    from refit.labels import LOOKBACK_DAYS
    from refit.requestlog import delete_model_data

    path = home / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        oldest = date.fromisoformat(manifest["first_day"])
        if (manifest["requests"], manifest["days"]) == (requests, days) and \
                (now.date() - oldest).days < LOOKBACK_DAYS - 1:
            progress(f"reusing the {requests:,} requests logged in {home} on {manifest['last_day']}")
            return manifest, True
    progress(f"filling {store.uri()} with {requests:,} requests over {days} days")
    delete_model_data(store, MODEL)
    manifest = fill_store(store, data_dir, requests, days, now, seed, progress)
    path.write_text(json.dumps(manifest))
    return manifest, False


def _logged(store, manifest: dict, now: datetime) -> pd.DataFrame:
    """Every logged request's id and label (only those two columns read), less those already labelled."""
    import pyarrow.parquet as pq

    from refit import requestlog

    frames = []
    for key in store.list(f"inference/model={MODEL}/"):
        part = pq.read_table(io.BytesIO(store.get_bytes(key)), columns=["request_id", "predicted_label"])
        frames.append(part.to_pandas())
    logged = pd.concat(frames, ignore_index=True)
    labelled = requestlog.label_pairs(store, MODEL, date.fromisoformat(manifest["first_day"]), now.date())
    return logged[~logged["request_id"].isin(set(labelled["request_id"]))].reset_index(drop=True)


def start_server(home: Path, token: str, log_path: Path, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """``refit serve`` for the bench model, with no champion: ready once ``/healthz`` answers."""
    port = free_port()
    env = os.environ | {"REFIT_HOME": str(home), "REFIT_STORE": "local", "REFIT_MODEL_NAME": MODEL,
                        "REFIT_SERVE_FEEDBACK_TOKEN": token, "REFIT_SERVE_POLL_SECONDS": "0",
                        "REFIT_SERVE_FEEDBACK_LABELS_PER_MINUTE": str(10**9)}  # the limiter is not what is measured
    for key in ("REFIT_STORE_ROOT", "REFIT_CONFIG", "REFIT_SERVE_LOG_SPILL_DIR", "REFIT_MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "refit.cli", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RefitError(f"refit serve exited with code {proc.returncode} before it answered (log: {log_path})")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RefitError(f"refit serve did not answer within {timeout:.0f} s (log: {log_path})")


def _post(connection: http.client.HTTPConnection, token: str, labels: list[dict]) -> tuple[float, dict]:
    body = json.dumps({"labels": labels})
    sent = time.perf_counter()
    connection.request("POST", "/feedback", body, {"Content-Type": "application/json",
                                                   "Authorization": f"Bearer {token}"})
    answer = connection.getresponse()
    data = answer.read()
    elapsed = time.perf_counter() - sent
    if answer.status != 200:
        raise RefitError(f"/feedback answered {answer.status}: {data[:300]!r}")
    return elapsed, json.loads(data)


class OtherReplica:
    """A replica that answered requests and holds them in its buffer until it flushes them to the store."""

    def __init__(self, store, rng: np.random.Generator):
        self.store, self.rng, self.buffer, self.flushed = store, rng, [], 0

    def answer(self, n: int) -> list[tuple[str, str]]:
        """``n`` requests answered now; returns their ids and labels (the labeller's truth)."""
        now = datetime.now(timezone.utc)
        ms = np.full(n, int(now.timestamp() * 1000))
        rows = [(rid, f"intent_{self.rng.integers(0, 150)}") for rid in _ids(ms, self.rng)]
        self.buffer += [(rid, label, now) for rid, label in rows]
        return rows

    def flush(self) -> int:
        from refit import requestlog

        if not self.buffer:
            return 0
        ids, labels, times = zip(*self.buffer)
        requestlog.write_inference(self.store, MODEL, pd.DataFrame({
            "request_id": ids, "timestamp": times, "text": [f"request {i}" for i in ids], "predicted_label": labels,
            "confidence": 0.9, "model_version": "1", "served_by": "champion"}))
        self.flushed += len(ids)
        self.buffer = []
        return len(ids)


def post_calls(url: str, token: str, logged: pd.DataFrame, replica: OtherReplica, calls: int, labels_per_call: int,
               unlogged_per_call: int, flush_every: int, rng: np.random.Generator,
               progress: Progress) -> tuple[list[float], list[dict], list[tuple[str, str]]]:
    """The calls, one at a time on one kept-alive connection; returns latencies, answers and every label sent."""
    from urllib.parse import urlsplit

    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    fresh = labels_per_call - unlogged_per_call
    if (calls - 1) * fresh + labels_per_call > len(logged):
        raise RefitError(f"{calls} calls need {calls * labels_per_call:,} unlabelled requests; "
                         f"{len(logged):,} are left in the store")
    order = rng.permutation(len(logged))
    latencies, answers, sent, used = [], [], [], 0
    try:
        for call in range(calls):
            last = call == calls - 1
            if last or (call and call % flush_every == 0):
                replica.flush()  # the other replica's buffer reaches the store; its labels can be joined now
            take = labels_per_call if last else fresh
            picked = logged.iloc[order[used: used + take]]
            used += take
            pairs = list(zip(picked["request_id"], picked["predicted_label"]))
            pairs += [] if last else replica.answer(unlogged_per_call)
            elapsed, answer = _post(connection, token, [{"request_id": i, "label": lab} for i, lab in pairs])
            latencies.append(elapsed)
            answers.append(answer)
            sent += pairs
            if (call + 1) % max(1, calls // 10) == 0 or last:
                ms = np.array(latencies) * 1000
                progress(f"{call + 1}/{calls} calls: p50 {np.percentile(ms, 50):.0f} ms, "
                         f"p95 {np.percentile(ms, 95):.0f} ms, labels waiting "
                         f"{answer['waiting'] + answer['earlier_waiting']['waiting']}")
    finally:
        connection.close()
    return latencies, answers, sent


def account(store, sent: list[tuple[str, str]], now: datetime, model_name: str = MODEL) -> dict:
    """Where each label sent (request id, label) ended up: kept, waiting, quarantined, or lost (none of those).

    Kept: a row in ``labels/model=<name>/date=*/``; waiting: in its
    ``pending/``; quarantined: in ``quarantine/model=<name>/labels/``. A join
    error is a kept label that differs from the one sent, or whose request's
    logged label differs from it (the labeller's truth here).
    """
    from refit import requestlog
    from refit.labels import LOOKBACK_DAYS, read_pending

    ids = [rid for rid, _ in sent]
    truth = dict(sent)
    labels = requestlog.label_pairs(store, model_name, (now - timedelta(days=LOOKBACK_DAYS)).date(), now.date(), ids)
    waiting = set(read_pending(store, model_name)["request_id"].astype(str)) & set(truth)
    quarantine = store.read_parquet_prefix(f"quarantine/model={model_name}/labels/")
    quarantined = set(quarantine["request_id"].astype(str)) & set(truth) if len(quarantine) else set()
    kept = set(labels["request_id"])
    logged = _logged_labels(store, model_name, ids)
    joined = labels.merge(logged, on="request_id", how="left")
    join_errors = int((joined["predicted_label"] != joined["label"]).sum()
                      + sum(truth[r] != lab for r, lab in zip(labels["request_id"], labels["label"])))
    return {"labels_sent": len(sent), "labels_kept": len(kept), "labels_waiting": len(waiting),
            "labels_quarantined": len(quarantined), "label_rows_for_sent_ids": len(labels),
            "labels_lost": len(set(truth) - kept - waiting - quarantined), "join_errors": join_errors}


def _logged_labels(store, model_name: str, ids: list[str]) -> pd.DataFrame:
    """``request_id, predicted_label`` of the logged requests among ``ids`` (only their days, two columns)."""
    import pyarrow.parquet as pq

    from refit.requestlog import request_day

    days = sorted({request_day(i) for i in ids} - {None})
    wanted, frames = set(ids), []
    for day in days:
        for key in store.list(f"inference/model={model_name}/date={day.isoformat()}/"):
            part = pq.read_table(io.BytesIO(store.get_bytes(key)), columns=["request_id", "predicted_label"])
            frame = part.to_pandas()
            frames.append(frame[frame["request_id"].isin(wanted)])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["request_id", "predicted_label"])


def other_replica_fault(store, model_name: str = MODEL, labels: int = 20) -> dict:
    """The fault ``feedback.other_replica``: labels arrive for requests another replica still buffers.

    A real ``serving.requestlog.RequestLog`` answers ``labels`` requests and
    keeps them in its buffer; their labels are imported as ``/feedback`` on a
    replica that does not hold them imports them, so they must wait. Then
    that replica flushes, and one settle (what the next ``/feedback`` call,
    ``refit labels import`` or an update does first) must join every label to
    its request. Returns ``account``'s counts and the counts before the
    flush; ``labels_lost`` and ``join_errors`` must be 0, ``labels_kept`` must
    equal ``labels_sent``.
    """
    from refit.labels import import_labels, resolve_pending
    from refit.requestlog import new_request_id
    from serving.requestlog import RequestLog

    replica = RequestLog(store, model_name, flush_rows=10**9, flush_seconds=3600)
    now = datetime.now(timezone.utc)
    rows = [{"request_id": new_request_id(now), "timestamp": now, "text": f"request {i}",
             "predicted_label": f"intent_{i % 7}", "confidence": 0.9, "model_version": "1", "served_by": "champion"}
            for i in range(labels)]
    replica.append(rows)
    sent = [(row["request_id"], row["predicted_label"]) for row in rows]
    before = import_labels(store, model_name, pd.DataFrame(sent, columns=["request_id", "label"]),
                           source="fault:other_replica", max_text_chars=2000)
    replica.close()  # flushes what it buffered
    settled = resolve_pending(store, model_name)
    for _ in range(20):  # another settler held the pending area: it settles ours too, or we do next time
        if not settled.busy:
            break
        time.sleep(0.5)
        settled = resolve_pending(store, model_name)
    return {"accepted_before_flush": before.accepted, "waiting_before_flush": before.waiting,
            "quarantined_before_flush": before.quarantined, "settled_kept": settled.kept,
            **account(store, sent, datetime.now(timezone.utc), model_name)}


def run_benchmark(home: Path, data_dir: Path, requests: int = 1_000_000, days: int = 30, calls: int = 200,
                  labels_per_call: int = 100, unlogged_per_call: int = 5, flush_every: int = 10, seed: int = 0,
                  progress: Progress = lambda what: None) -> dict:
    """Fill (or reuse) the store, start the server, post the calls, account for every label; returns the figures."""
    from refit.store import LocalStore

    home = Path(home).expanduser().resolve()
    store = LocalStore(home / "store")
    now = datetime.now(timezone.utc)
    started = time.perf_counter()
    manifest, reused = _filled(home, store, data_dir, requests, days, now, seed, progress)
    fill_seconds = time.perf_counter() - started
    logged = _logged(store, manifest, now)
    rng = np.random.default_rng(seed + int(now.timestamp()))
    replica = OtherReplica(store, rng)
    token = secrets.token_hex(16)
    proc, url = start_server(home, token, Path(tempfile.mkdtemp(prefix="refit-bench-feedback-")) / "serve.log")
    progress(f"refit serve answers at {url} (no champion: /feedback needs none)")
    try:
        latencies, answers, sent = post_calls(url, token, logged, replica, calls, labels_per_call,
                                              unlogged_per_call, flush_every, rng, progress)
    finally:
        stop_server(proc)
    ms = np.array(latencies) * 1000
    answered = {key: sum(a[key] for a in answers) for key in ("accepted", "waiting", "quarantined")}
    settled = {key: sum(a["earlier_waiting"][key] for a in answers) for key in ("kept", "quarantined")}
    return {"requests_logged": manifest["requests"], "days": manifest["days"], "labels_per_call": labels_per_call,
            "calls": calls, "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(float(ms.max()), 1),
            "target_p95_ms": TARGET_P95_MS, "store_reused": reused, "fill_seconds": round(fill_seconds, 1),
            "unlogged_per_call": unlogged_per_call, "replica_rows_flushed": replica.flushed,
            "answered": answered, "settled_later": settled, **account(store, sent, datetime.now(timezone.utc)),
            "home": str(home)}


def table(result: dict):
    from rich.table import Table

    out = Table(title="refit bench feedback", show_header=False)
    for key, value in result.items():
        out.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    return out
