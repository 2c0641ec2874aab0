"""Faults of ``refit bench faults`` in the loop's own processes: a stopped update or rollback, an expired lock,
two updates at once.

- ``update.kill.*`` / ``update.term.*``: SIGKILL (or SIGTERM) at each stage
  boundary of an update, one child each; the next update recovers.
- ``rollback.kill.*``: SIGKILL at each step of a hand-run rollback; the
  rollback run again finishes it.
- ``lock.expired_two_waiters``: a lock holder paused past its lease while two
  waiters break the expired lock at once; the woken holder must write nothing.
- ``update.two_at_once``: two updates of one model at once; at most one promotes.

Plain functions of a ``Bench`` (``refit.bench.faults``), as in
``refit.bench.faults_safety``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from refit.bench.children import stop_child
from refit.bench.faults_results import Child, Pending, now_ms

if TYPE_CHECKING:
    from refit.bench.faults import Bench

PROMOTED_AT = {"promote", "after_promote"}  # a kill here comes after the alias moved
LOCK_TTL = 3.0


def update_series(bench: Bench, how: str, points: list[str]) -> None:
    """Kill (or SIGTERM) an update at each stage boundary, one child each; then the next update recovers."""
    pending: list[Pending] = []
    for point in points:
        name = f"update.{how}.{point}"
        bench.progress(f"fault {name}: refit update, {'SIGKILL' if how == 'kill' else 'SIGTERM'} at "
                       f"update.{point}")
        champion = bench.alias("champion")
        reached = bench.points_dir / f"update.{point}.reached"
        reached.unlink(missing_ok=True)
        try:
            for _ in range(3):  # an update the gate refuses never reaches the later points: the next domain
                child = bench.update(name.replace(".", "-"), faults=f"update.{point}={how}")
                if reached.exists() or child.rc != 0 or (child.result or {}).get("promoted") is not False:
                    break
                champion = bench.back_to_less_learned(name) if point in PROMOTED_AT else champion
        except RuntimeError as exc:  # no domain left that this champion's gate can pass
            bench.record(name, [f"could not run: {exc}"], [])
            continue
        problems, notes = [], [f"exit {child.rc} after {child.seconds:.0f} s"]
        if not reached.exists():
            problems.append(f"the fault point update.{point} was never reached ({child.tail()})")
        if how == "kill" and child.rc != -signal.SIGKILL:
            problems.append(f"expected death by SIGKILL, got exit {child.rc}")
        if how == "term" and child.rc == 0:
            problems.append("the update exited 0 after SIGTERM: a stopped update must say it did not finish")
        problems += bench.champion_gated()
        now = bench.alias("champion")
        if point in PROMOTED_AT and reached.exists():
            notes.append(f"champion v{champion} -> v{now} (the alias moved before the signal)")
            if now == champion:
                problems.append("the promotion did not happen before the signal")
        elif now != champion:
            problems.append(f"champion moved v{champion} -> v{now} although the update stopped before "
                            "promoting")
        pending.append(Pending(name, child, problems, notes, bench.registry_problems()))
    bench.progress(f"recovery: the next update, after {len(points)} stopped update(s)")
    try:
        recovery = bench.update(f"recovery-after-{how}")
    except RuntimeError as exc:  # every domain refused: the recovery is the same file again, refused or not
        recovery = bench.update(f"recovery-after-{how}", path=next(iter(bench.files.values())))
        bench.progress(f"recovery on {next(iter(bench.files))} again ({exc})")
    recovered = f"recovered by the next update (exit {recovery.rc}, promoted " \
                f"{(recovery.result or {}).get('promoted')})"
    for item in pending:
        if recovery.rc != 0:
            item.problems.append(f"the recovery update failed: {recovery.tail()}")
        item.notes.append(recovered)
        bench.after_recovery(item)


def rollback_fault(bench: Bench, point: str) -> None:
    name = f"rollback.kill.{point}"
    bench.ensure_previous()
    champion, previous = bench.alias("champion"), bench.alias("previous")
    bench.progress(f"fault {name}: refit rollback, SIGKILL at rollback.{point} (champion v{champion}, "
                   f"previous v{previous})")
    reached = bench.points_dir / f"rollback.{point}.reached"
    reached.unlink(missing_ok=True)
    child = bench.cli(name.replace(".", "-"), "rollback", "--reason", f"bench faults: {name}", "--json",
                      faults=f"rollback.{point}=kill")
    problems, notes = [], [f"exit {child.rc}"]
    if not reached.exists():
        problems.append(f"the fault point rollback.{point} was never reached ({child.tail()})")
    if child.rc != -signal.SIGKILL:
        problems.append(f"expected death by SIGKILL, got exit {child.rc}")
    problems += bench.champion_gated()
    now = bench.alias("champion")
    if now not in (champion, previous):
        problems.append(f"champion is v{now}, neither v{champion} nor v{previous}")
    notes.append(f"after the kill: champion v{now}, previous v{bench.alias('previous')}")
    bench.progress("recovery: refit rollback again")
    again = bench.cli(f"recovery-{point}", "rollback", "--reason", f"bench faults: again after {name}", "--json")
    final, bad_tags = bench.alias("champion"), bench.tags(champion)
    if now == champion:  # nothing moved: the rollback run again must do it all
        if again.rc != 0 or final != previous:
            problems.append(f"the rollback run again did not finish it (exit {again.rc}, champion v{final}): "
                            f"{again.tail()}")
        notes.append(f"rollback again: exit {again.rc}, champion v{final}")
    else:  # the aliases moved: the rollback run again finishes the record the killed one never wrote
        if again.rc != 0 or final != previous:
            problems.append(f"the rollback run again after the aliases moved did not finish its record "
                            f"(exit {again.rc}, champion v{final}): {again.tail()}")
        notes.append(f"rollback again finished the record (exit {again.rc}), champion v{final}")
    if bad_tags.get("refit.deployed") != "rolled back" or not bad_tags.get("refit.rollback_run_id"):
        problems.append(f"v{champion} (demoted) carries refit.deployed={bad_tags.get('refit.deployed')!r}, "
                        f"rollback run {bad_tags.get('refit.rollback_run_id')!r}: the rollback's record is "
                        "incomplete")
    bench.after_recovery(Pending(name, child, problems, notes))


def lock_fault(bench: Bench) -> None:
    """A holder paused past its lease; two waiters break the expired lock at once; the holder wakes and must
    write nothing."""
    name = "lock.expired_two_waiters"
    bench.progress(f"fault {name}: lock holder SIGSTOPped past its {LOCK_TTL:.0f} s lease, two waiters")
    out = bench.home / "lock-fault"
    out.mkdir(exist_ok=True)
    for stale in out.iterdir():
        stale.unlink()
    started = now_ms()
    holder = bench.helper("lock-holder", str(out))
    deadline = time.monotonic() + 180
    while not (out / "holder.json").exists() and holder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    problems, notes = [], []
    if not (out / "holder.json").exists():
        stop_child(holder, signal.SIGKILL, group=True)
        return bench.record(name, [f"the holder never took the lock (exit {holder.poll()})"], [])
    os.killpg(holder.pid, signal.SIGSTOP)
    waiters = [bench.helper("lock-waiter", str(out), str(i)) for i in (1, 2)]
    codes = [w.wait(timeout=300) for w in waiters]
    os.killpg(holder.pid, signal.SIGCONT)
    (out / "go").write_text("go")
    holder_rc = holder.wait(timeout=120)
    held = json.loads((out / "holder.json").read_text())
    got = [json.loads(p.read_text()) for p in sorted(out.glob("waiter-*.json"))]
    if codes != [0, 0] or len(got) != 2:
        problems.append(f"waiters exited {codes}, {len(got)} of 2 held the lock")
    else:
        a, b = sorted(got, key=lambda w: w["acquired"])
        if a["released"] > b["acquired"]:
            problems.append(f"both waiters held the lock at once ({a['released'] - b['acquired']:.2f} s overlap)")
        if not (held["number"] < a["number"] < b["number"]):
            problems.append(f"fencing numbers not increasing: holder {held['number']}, waiters "
                            f"{a['number']}, {b['number']}")
        if not (a.get("fenced") and b.get("fenced")):
            problems.append("a waiter holding the lock was refused at the fence")
        notes.append(f"waiters held it {a['acquired'] - held['acquired']:.1f} s and "
                     f"{b['acquired'] - held['acquired']:.1f} s after the holder took it, fences "
                     f"{a['number']}, {b['number']}")
    final = json.loads((out / "holder-final.json").read_text()) if (out / "holder-final.json").exists() else {}
    if holder_rc != 0 or not str(final.get("fence", "")).startswith("refused"):
        problems.append(f"the woken holder was not refused at the fence (exit {holder_rc}, {final})")
    else:
        notes.append(f"woken holder: {final['fence'][:120]}")
    from refit.store import open_store
    from registry import versions

    if versions.lock_key(bench.name) in open_store(bench.settings).list("locks/"):
        problems.append("the lock object was left behind")
    problems += bench.champion_gated()
    running = bench.running_runs(started)
    if running:
        problems.append(f"left RUNNING: {', '.join(running)}")
    bench.record(name, problems, notes)


def two_at_once(bench: Bench) -> None:
    name = "update.two_at_once"
    path = bench.fresh_file()
    champion = bench.alias("champion")
    bench.progress(f"fault {name}: two refit update processes of {path.name} at once (champion v{champion})")
    before = set(bench.all_versions())
    runs = [bench.start(f"two-at-once-{i}", "update", "--labels", str(path), "--force", "--reason",
                        f"bench faults: {name} {i}", "--json") for i in (1, 2)]
    children = [bench.finish(proc, log, started) for proc, log, started in runs]
    problems, notes = [], [f"exits {[c.rc for c in children]}"]
    problems += bench.champion_gated()
    new = {v: t for v, t in bench.all_versions().items() if v not in before}
    promoted = [v for v, t in new.items() if t.get("refit.deployed") == "champion"]
    now = bench.alias("champion")
    if len(promoted) > 1:
        problems.append(f"both promoted: {promoted}")
    if now != champion and now not in new:
        problems.append(f"champion v{now} is neither the old one nor a new one")
    notes.append(f"new versions {sorted(new)}: " + ", ".join(
        f"v{v} {t.get('refit.gate_verdict')}/{t.get('refit.deployed', 'not deployed')}" for v, t in sorted(new.items())))
    loser = [c for c in children if c.rc != 0]
    if loser:
        notes.append(f"the other: {loser[0].tail(1)[-200:]}")
    window = Child(0, 0, children[0].log, min(c.started_ms for c in children), max(c.ended_ms for c in children))
    bench.after_recovery(Pending(name, window, problems, notes))


# -- the lock fault's helper processes (python -m refit.bench.faults lock-holder|lock-waiter ...) ---------------

def lock_role(role: str, out: Path, index: str = "") -> None:
    """``python -m refit.bench.faults lock-holder|lock-waiter OUT [INDEX]``: take the lock, write what happened."""
    from refit.settings import Settings
    from refit.store import open_store
    from registry import versions
    from registry.tracking import configure

    settings = Settings()
    configure(settings)
    store = open_store(settings)
    name = settings.model_name
    if role == "lock-holder":
        with versions.promotion_lock(store, name, "bench holder", ttl_seconds=LOCK_TTL, wait_seconds=60) as lease:
            (out / "holder.json").write_text(json.dumps({"acquired": time.time(), "number": lease.number}))
            deadline = time.monotonic() + 600
            while not (out / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            try:
                lease.fence(name)
                verdict = "fenced: a stale holder could have written the aliases"
            except versions.PromotionConflict as exc:
                verdict = f"refused: {exc}"
        (out / "holder-final.json").write_text(json.dumps({"fence": verdict}))
        return
    with versions.promotion_lock(store, name, f"bench waiter {index}", ttl_seconds=LOCK_TTL,
                                 wait_seconds=120) as lease:
        acquired = time.time()
        time.sleep(1.0)
        fenced = True
        try:
            lease.fence(name)
        except versions.PromotionConflict:
            fenced = False
        released = time.time()
    (out / f"waiter-{index}.json").write_text(json.dumps({"acquired": acquired, "released": released,
                                                          "number": lease.number, "fenced": fenced}))
