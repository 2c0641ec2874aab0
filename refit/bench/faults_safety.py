"""Faults of ``refit bench faults`` that go after what fails quietly: the golden suite, records, the fence, leases,
labels and a stopped adopt.

Each sets up what it needs (a previous champion, a domain its gate can pass,
a second serving replica) instead of hoping the run left it there, runs its
fault in real processes, and checks that the fault point was reached. They
are plain functions of a ``Bench`` (``refit.bench.faults``); ``golden_problems``
is the suite check every fault's recovery runs.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from refit.bench.faults import Bench

SAFETY_FAULTS = ("golden.race.rollback_between", "rollback.hand_after_server", "registry.fresh_store",
                 "lease.renew_store_error", "feedback.other_replica", "adopt.kill.after_register")
PROMOTED_KINDS = {"update", "hotfix"}
EVER_CHAMPION = {"champion", "rolled back"}  # refit.deployed of a version whose alias moved; "abandoned" never did


def golden_problems(bench: Bench) -> list[str]:
    """Every promoted update's suites are in the store as recorded, and its fresh set joined the suite.

    A version that was ever champion records the suite it was judged on
    (``refit.golden_version``/``_fingerprint``) and the suite its fresh holdout
    joined (``refit.golden_after_*``); each must name a stored suite version
    whose rows hash to the recorded fingerprint, and that later suite must
    hold rows added by it. The champion's suite is never older than that.
    """
    from refit.errors import RefitError
    from refit.evalsets import read_golden, suite_versions
    from refit.store import open_store

    store = open_store(bench.settings)
    stored = set(suite_versions(store, bench.name))
    problems = []
    cache: dict[int, object] = {}

    def suite(number: int):
        if number not in cache:
            try:
                cache[number] = read_golden(store, bench.name, number)
            except RefitError:
                cache[number] = None
        return cache[number]

    for version, tags in sorted(bench.all_versions().items()):
        if tags.get("refit.kind") not in PROMOTED_KINDS or tags.get("refit.deployed") not in EVER_CHAMPION:
            continue
        for prefix in ("refit.golden", "refit.golden_after"):
            number, recorded = tags.get(f"{prefix}_version", ""), tags.get(f"{prefix}_fingerprint")
            if not number.isdigit():
                problems.append(f"v{version} (promoted) records no {prefix}_version: its fresh set may be lost")
                continue
            found = suite(int(number)) if int(number) in stored else None
            if found is None:
                problems.append(f"v{version}'s {prefix} suite v{number} is not in the store")
            elif found.fingerprint != recorded:
                problems.append(f"v{version}'s {prefix} suite v{number} hashes to {found.fingerprint[:12]}, "
                                f"not the {str(recorded)[:12]} it recorded")
            elif prefix == "refit.golden_after" and int(tags.get("refit.fresh_rows", "0") or 0) and \
                    not (found.frame["added"] == int(number)).any():
                problems.append(f"suite v{number} holds no row of v{version}'s fresh set")
    return problems


def _lock_body(bench: Bench) -> dict:
    from refit.store import open_store
    from registry import versions

    try:
        return json.loads(open_store(bench.settings).get_bytes(versions.lock_key(bench.name)))
    except (KeyError, ValueError):
        return {}


def _wait_for(path: Path, proc, seconds: float = 900) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return path.exists()


def _rollback_records(bench: Bench, version: int) -> list[str]:
    runs = bench.client().search_runs([bench.configure()], f"tags.`refit.run_type` = 'rollback' and "
                                      f"tags.`refit.model` = '{bench.name}' and "
                                      f"tags.`refit.rolled_back_version` = '{version}'")
    return [run.info.run_id for run in runs]


def golden_race(bench: Bench) -> None:
    """Update A trains on suite k; B promotes (suite k+1) and is rolled back; A promotes: B's rows must stay."""
    from refit.bench.faults import Child, Pending

    name = "golden.race.rollback_between"
    champion = bench.alias("champion")
    first = bench.fresh_file()
    second = bench.fresh_file(skip=(first.stem,))
    bench.progress(f"fault {name}: update A ({first.stem}) paused after training; update B ({second.stem}) "
                   f"promotes and is rolled back; A goes on (champion v{champion})")
    paused = bench.points_dir / "update.after_train.paused"
    paused.unlink(missing_ok=True)
    proc, log, started = bench.start("golden-race-a", "update", "--labels", str(first), "--force", "--json",
                                     faults="update.after_train=pause")
    problems, notes = [], []
    if not _wait_for(paused, proc):
        problems.append("update A never reached update.after_train")
    b = bench.update("golden-race-b", path=second)
    promoted_b = (b.result or {}).get("promoted")
    notes.append(f"B exit {b.rc}, promoted {promoted_b} as v{(b.result or {}).get('version')}")
    if promoted_b:
        back = bench.cli("golden-race-rollback", "rollback", "--reason", f"bench faults: {name}", "--json")
        notes.append(f"rollback exit {back.rc}, champion v{bench.alias('champion')}")
    else:
        problems.append(f"update B did not promote, so the race did not happen: {b.tail()}")
    paused.unlink(missing_ok=True)
    a = bench.finish(proc, log, started, proc.wait(timeout=900))
    notes.append(f"A exit {a.rc}, promoted {(a.result or {}).get('promoted')}")
    if a.rc != 0:
        problems.append(f"update A failed: {a.tail()}")
    problems += bench.champion_gated() + golden_problems(bench)
    window = Child(0, 0, a.log, started, a.ended_ms)
    bench.after_recovery(Pending(name, window, problems, notes))


def hand_after_server(bench: Bench) -> None:
    """The server's automatic rollback holds the lock; a hand-run rollback waits on it, then must not record it
    again: one record, the champion the version before."""
    from refit.bench.faults import Pending

    name = "rollback.hand_after_server"
    bench.ensure_previous()
    bad, previous = bench.alias("champion"), bench.alias("previous")
    bench.progress(f"fault {name}: the server's rollback of v{bad} paused before it releases the lock; refit "
                   "rollback by hand meanwhile")
    paused = bench.points_dir / "rollback.before_release.paused"
    paused.unlink(missing_ok=True)
    server = bench.helper("server-rollback", str(bad), str(previous),
                          env={"REFIT_FAULTS": "rollback.before_release=pause"})
    problems, notes = [], []
    if not _wait_for(paused, server, 300):
        problems.append(f"the server's rollback never reached rollback.before_release (exit {server.poll()})")
    hand_proc, hand_log, hand_started = bench.start("hand-rollback", "rollback", "--reason",
                                                    f"bench faults: {name}", "--json")
    time.sleep(3)  # the hand rollback is waiting on the lock: it must not finish while the server holds it
    if hand_proc.poll() is not None:
        problems.append(f"the hand rollback ended (exit {hand_proc.returncode}) while the server held the lock")
    paused.unlink(missing_ok=True)
    server_rc = server.wait(timeout=300)
    hand = bench.finish(hand_proc, hand_log, hand_started, hand_proc.wait(timeout=600))
    records = _rollback_records(bench, bad)
    champion = bench.alias("champion")
    notes.append(f"server rollback exit {server_rc}; hand rollback exit {hand.rc}: {hand.tail(1)[-160:]}; "
                 f"{len(records)} record(s) of v{bad}; champion v{champion}")
    if server_rc != 0:
        problems.append(f"the server's rollback exited {server_rc}")
    if len(records) != 1:
        problems.append(f"v{bad}'s rollback is recorded {len(records)} times, not once")
    if champion != previous:
        problems.append(f"champion is v{champion}, not v{previous} (the version before v{bad})")
    if hand.rc == 0 and (hand.result or {}).get("rolled_back") == bad:
        problems.append(f"the hand rollback reported rolling back v{bad}, which the server had done")
    problems += bench.champion_gated()
    bench.after_recovery(Pending(name, hand, problems, notes))


def fresh_store(bench: Bench) -> None:
    """The store's fence (counter and mark) is gone, as in a new or restored store: an update still promotes."""
    from refit.bench.faults import Pending
    from refit.store import open_store
    from registry import versions

    name = "registry.fresh_store"
    bench.back_to_less_learned(name)  # the update must be able to pass its gate
    removed = versions.forget_fence(open_store(bench.settings), bench.name, keep_mark=False)
    bench.progress(f"fault {name}: the fence's {len(removed)} object(s) removed from the store, then an update")
    child = bench.update("fresh-store-update")
    problems, notes = [], [f"removed {len(removed)} fence object(s); update exit {child.rc}, promoted "
                                f"{(child.result or {}).get('promoted')}"]
    if not removed:
        problems.append("there was no fence in the store to remove: the fault tested nothing")
    if child.rc != 0 or not (child.result or {}).get("promoted"):
        problems.append(f"the update after the store lost its fence did not promote: {child.tail()}")
    problems += bench.champion_gated() + golden_problems(bench)
    bench.after_recovery(Pending(name, child, problems, notes))


def renew_store_error(bench: Bench) -> None:
    """Every lease renewal's answer is lost while a promotion holds the lock past its lease: the renewer goes on
    writing, and the promotion completes."""
    from refit.bench.faults import Pending
    from registry import versions

    name = "lease.renew_store_error"
    champion = bench.back_to_less_learned(name)  # only a passing update reaches the lock
    bench.progress(f"fault {name}: an update paused under the promotion lock for longer than the lease, every "
                   "renewal's answer lost")
    paused = bench.points_dir / "update.golden_written.paused"
    reached = bench.points_dir / "lease.renew_written.reached"
    for marker in (paused, reached):
        marker.unlink(missing_ok=True)
    proc, log, started = bench.start("renew-error-update", "update", "--labels", str(bench.fresh_file()),
                                     "--force", "--json",
                                     faults="update.golden_written=pause;lease.renew_written=raise")
    problems, notes = [], []
    if _wait_for(paused, proc):
        first = _lock_body(bench).get("renewals", 0)
        time.sleep(versions.LEASE_SECONDS * 1.3)  # past a whole lease: a dead renewer would let the lock lapse
        later = _lock_body(bench).get("renewals", 0)
        notes.append(f"renewals {first} -> {later} while paused")
        if not reached.exists():
            problems.append("the fault point lease.renew_written was never reached")
        if later <= first:
            problems.append(f"the lock was not renewed while its answers were lost (renewals {first} -> {later})")
    else:
        problems.append("the update never reached update.golden_written (under the lock)")
    paused.unlink(missing_ok=True)
    child = bench.finish(proc, log, started, proc.wait(timeout=900))
    promoted = (child.result or {}).get("promoted")
    notes.append(f"update exit {child.rc}, promoted {promoted}, champion v{champion} -> v{bench.alias('champion')}")
    refused_cleanly = child.rc != 0 and "Traceback" not in child.log.read_text(errors="replace")
    if not (child.rc == 0 and promoted) and not refused_cleanly:
        problems.append(f"the promotion neither completed nor was cleanly refused: {child.tail()}")
    problems += bench.champion_gated() + golden_problems(bench)
    bench.after_recovery(Pending(name, child, problems, notes))


def adopt_killed(bench: Bench) -> None:
    """``refit adopt`` SIGKILLed right after registering v1; a second ``refit adopt`` of the same model completes."""
    from refit.bench.faults import Pending

    name = "adopt.kill.after_register"
    model = f"{bench.base_name}-adopted"
    checkpoint, train = _adoptable(bench)
    args = ("adopt", "--model", str(checkpoint), "--train", str(train), "--model-name", model, "--json")
    env = {"REFIT_MODEL_NAME": model}
    reached = bench.points_dir / "adopt.after_register.reached"
    reached.unlink(missing_ok=True)
    bench.progress(f"fault {name}: refit adopt of {model}, SIGKILL after registering; then refit adopt again")
    first = bench.cli("adopt-killed", *args, faults="adopt.after_register=kill", env=env)
    problems, notes = [], [f"first adopt exit {first.rc}"]
    if not reached.exists():
        problems.append(f"the fault point adopt.after_register was never reached ({first.tail()})")
    if first.rc != -signal.SIGKILL:
        problems.append(f"expected death by SIGKILL, got exit {first.rc}")
    again = bench.cli("adopt-again", *args, env=env)
    result = again.result or {}
    notes.append(f"second adopt exit {again.rc}: v{result.get('version')}, golden accuracy "
                 f"{result.get('golden_accuracy')}")
    if again.rc != 0:
        problems.append(f"the second refit adopt did not complete: {again.tail()}")
    from registry import versions

    bench.configure()
    champion = versions.alias_version(model, versions.CHAMPION)
    if champion is None or champion != result.get("version"):
        problems.append(f"{model} has champion {champion}, not the version the second adopt reported")
    bench.after_recovery(Pending(name, again, problems, notes))


def _adoptable(bench: Bench) -> tuple[Path, Path]:
    """A team's checkpoint (the packaged MiniLM with a head for one domain, saved with plain transformers) and
    its training file, written once per home."""
    root = bench.home / "adopt-input"
    checkpoint, train = root / "checkpoint", next(iter(bench.files.values()))
    if (checkpoint / "config.json").is_file():
        return checkpoint, train
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from refit import modeling

    labels = sorted(pd.read_csv(train)["label"].unique())
    base = modeling.packaged_base_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)})
    model.save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(base).save_pretrained(checkpoint)
    return checkpoint, train


def server_rollback_role(bad: int, previous: int) -> None:
    """``python -m refit.bench.faults server-rollback BAD PREVIOUS``: the rollback ``refit serve`` makes when a
    guard trips, through the same call, in a process of its own."""
    from refit.settings import Settings
    from refit.store import open_store
    from registry.rollout import roll_back
    from registry.tracking import configure

    settings = Settings()
    experiment = configure(settings)
    roll_back(settings.model_name, bad, "bench faults: a guard tripped", experiment_id=experiment,
              store=open_store(settings), source="refit serve (bench faults)", restore_to=previous)


def other_replica(bench: Bench, labels: int = 24) -> None:
    """Two ``refit serve`` replicas: A answers requests and keeps them in its buffer; their labels reach B's
    ``/feedback``, where the ids are not visible yet, so they wait; A flushes; one settle joins every label."""
    from datetime import datetime, timezone

    import httpx

    from refit.bench.children import free_port, wait_ready
    from refit.bench.faults import _stop
    from refit.bench.feedback import account
    from refit.labels import resolve_pending
    from refit.store import open_store

    name = "feedback.other_replica"
    bench.progress(f"fault {name}: replica A buffers {labels} answered requests; their labels go to replica B")
    admin, feedback = "bench-admin", "bench-feedback"
    servers, problems, notes = [], [], []
    urls = []
    try:
        for replica, flush_seconds in (("a", "3600"), ("b", "1")):
            port = free_port()
            env = {"REFIT_SERVE_PORT": str(port), "REFIT_SERVE_ADMIN_TOKEN": admin,
                   "REFIT_SERVE_FEEDBACK_TOKEN": feedback, "REFIT_SERVE_POLL_SECONDS": "0",
                   "REFIT_SERVE_LOG_FLUSH_SECONDS": flush_seconds, "REFIT_SERVE_LOG_FLUSH_ROWS": "1000000"}
            proc, log, _ = bench.start(f"replica-{replica}", "serve", env=env)
            servers.append(proc)
            urls.append(f"http://127.0.0.1:{port}")
            wait_ready(urls[-1], proc, timeout=300)
        texts = (bench.texts * (labels // max(1, len(bench.texts)) + 1))[:labels]
        answer = httpx.post(urls[0] + "/predict", json={"texts": texts}, timeout=120).json()["predictions"]
        sent = [(p["request_id"], p["label"]) for p in answer]
        reply = httpx.post(urls[1] + "/feedback", headers={"Authorization": f"Bearer {feedback}"}, timeout=120,
                           json={"labels": [{"request_id": r, "label": label} for r, label in sent]}).json()
        notes.append(f"B's /feedback before A flushed: {reply}")
        if reply.get("waiting", 0) != len(sent):
            problems.append(f"{len(sent) - reply.get('waiting', 0)} of {len(sent)} labels did not wait for "
                            "replica A's requests (the fault tested nothing, or they were quarantined)")
        flushed = httpx.post(urls[0] + "/admin/flush", headers={"Authorization": f"Bearer {admin}"}, timeout=120)
        notes.append(f"A flushed: HTTP {flushed.status_code}")
        store = open_store(bench.settings)
        settled = resolve_pending(store, bench.name)
        for _ in range(20):  # a settle already under way holds the pending area: it settles these too
            if not settled.busy:
                break
            time.sleep(0.5)
            settled = resolve_pending(store, bench.name)
        counts = account(store, sent, datetime.now(timezone.utc), bench.name)
        notes.append(", ".join(f"{k} {v}" for k, v in counts.items()))
        bench.labels_lost += counts["labels_lost"]
        if counts["labels_kept"] != len(sent) or counts["labels_lost"] or counts["join_errors"]:
            problems.append(f"of {len(sent)} labels {counts['labels_kept']} joined, {counts['labels_waiting']} "
                            f"still waiting, {counts['labels_lost']} lost, {counts['join_errors']} joined wrong")
    except Exception as exc:  # noqa: BLE001 - a fault that could not run is reported, never a pass
        problems.append(f"the fault could not run: {type(exc).__name__}: {exc}")
    finally:
        for proc in servers:
            _stop(proc)
    bench.record(name, problems + bench.champion_gated(), notes)
