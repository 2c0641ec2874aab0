"""One contract, two backends: every test runs on the local directory and on a real S3 endpoint."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from refit import requestlog
from refit.errors import RefitError
from refit.settings import Settings
from refit.store import LocalStore, open_store

KEYS = ["a/b", "a/b/x.txt", "a/b/y/z.txt", "a/bc/w.txt", "a/c.txt", "top.txt"]


def test_put_get_bytes_roundtrip(store):
    uri = store.put_bytes("dir/sub/file.bin", b"\x00hello\xff")
    assert store.get_bytes("dir/sub/file.bin") == b"\x00hello\xff"
    assert uri == store.uri("dir/sub/file.bin")
    store.put_bytes("dir/sub/file.bin", b"v2")
    assert store.get_bytes("dir/sub/file.bin") == b"v2"


def test_get_missing_key_raises_keyerror(store):
    with pytest.raises(KeyError):
        store.get_bytes("no/such/key")
    store.put_bytes("no/such/other", b"x")
    with pytest.raises(KeyError):
        store.get_bytes("no/such/key")


def test_list_is_sorted_and_by_prefix_string(store):
    # An object "a/b" beside objects under "a/b/" is possible on S3 but not in a directory,
    # so the shared layout leaves it out.
    keys = [k for k in KEYS if k != "a/b"]
    for key in reversed(keys):
        store.put_bytes(key, key.encode())
    assert store.list() == sorted(keys)
    assert store.list("a/") == ["a/b/x.txt", "a/b/y/z.txt", "a/bc/w.txt", "a/c.txt"]
    # Prefixes are strings, not directories: "a/b" also matches the sibling "a/bc/".
    assert store.list("a/b") == ["a/b/x.txt", "a/b/y/z.txt", "a/bc/w.txt"]
    assert store.list("a/b/") == ["a/b/x.txt", "a/b/y/z.txt"]
    assert store.list("a/b/y") == ["a/b/y/z.txt"]
    assert store.list("t") == ["top.txt"]
    assert store.list("nothing/") == []
    assert store.list("a/nothing") == []


def test_list_of_empty_store(store):
    assert store.list() == []
    assert store.list("x/") == []


def test_delete_and_exists(store):
    store.put_bytes("d/one.txt", b"1")
    store.put_bytes("d/one.txt.bak", b"2")
    assert store.exists("d/one.txt")
    assert not store.exists("d/one")  # a prefix of a key is not a key
    assert not store.exists("d/")
    store.delete("d/one.txt")
    assert not store.exists("d/one.txt")
    assert store.exists("d/one.txt.bak")
    with pytest.raises(KeyError):
        store.get_bytes("d/one.txt")
    store.delete("d/one.txt")  # deleting a missing key is not an error
    assert store.list("d/") == ["d/one.txt.bak"]


def test_parquet_roundtrip(store):
    frame = pd.DataFrame({"text": ["hi", "there", "ünïcode"], "n": [1, 2, 3], "x": [0.5, None, 2.0]})
    store.put_parquet("p/frame.parquet", frame)
    back = store.get_parquet("p/frame.parquet")
    pd.testing.assert_frame_equal(back, frame)


def test_read_parquet_prefix_concatenates_parts(store):
    store.put_parquet("parts/x/part-1.parquet", pd.DataFrame({"a": [1, 2]}))
    store.put_parquet("parts/x/part-2.parquet", pd.DataFrame({"a": [3]}))
    store.put_bytes("parts/x/README.txt", b"not parquet")
    store.put_parquet("parts/y/part-1.parquet", pd.DataFrame({"a": [99]}))
    frame = store.read_parquet_prefix("parts/x/")
    assert sorted(frame["a"].tolist()) == [1, 2, 3]
    assert list(frame.index) == [0, 1, 2]
    empty = store.read_parquet_prefix("parts/none/")
    assert isinstance(empty, pd.DataFrame) and empty.empty


@pytest.mark.parametrize("key", ["/abs", "a/../b", "", "..", "a/.."])
def test_invalid_keys_raise_valueerror(store, key):
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(key)
    with pytest.raises(ValueError):
        store.delete(key)


def test_uri_scheme(store):
    uri = store.uri("k/v.txt")
    assert uri.startswith(("file://", "s3://"))
    assert uri.endswith("k/v.txt")
    assert store.put_bytes("k/v.txt", b"x") == uri
    if uri.startswith("s3://"):
        assert uri == f"s3://{store.bucket}/k/v.txt"
    else:
        assert uri == (store.root / "k/v.txt").as_uri()


def test_same_contract_on_both_backends(tmp_path, s3_endpoint):
    """The same sequence of calls gives the same answers on the two backends."""
    import uuid

    from refit.store import LocalStore, S3Store

    local = LocalStore(tmp_path / "cmp")
    s3 = S3Store(bucket=f"cmp-{uuid.uuid4().hex[:12]}", endpoint_url=s3_endpoint)
    s3.ensure_bucket()
    keys = [k for k in KEYS if k != "a/b"] + ["a/b-", "a/b.txt", "ab/c"]
    answers = []
    for backend in (local, s3):
        for key in keys:
            backend.put_bytes(key, key.encode())
        backend.delete("a/c.txt")
        answers.append({p: backend.list(p) for p in ["", "a", "a/", "a/b", "a/b/", "ab", "a/c", "zzz"]}
                       | {"exists": [backend.exists(k) for k in keys]})
    assert answers[0] == answers[1]


def test_s3_store_prefix_is_invisible_in_keys(s3_endpoint):
    import uuid

    from refit.store import S3Store

    bucket = f"pfx-{uuid.uuid4().hex[:12]}"
    inner = S3Store(bucket=bucket, prefix="/team/x/", endpoint_url=s3_endpoint)
    inner.ensure_bucket()
    outer = S3Store(bucket=bucket, endpoint_url=s3_endpoint)
    assert inner.put_bytes("k.txt", b"1") == f"s3://{bucket}/team/x/k.txt"
    assert inner.list() == ["k.txt"]
    assert outer.list() == ["team/x/k.txt"]
    assert inner.get_bytes("k.txt") == b"1"


def test_local_store_never_lists_outside_its_root(tmp_path):
    from refit.store import LocalStore

    (tmp_path / "outside.txt").write_bytes(b"x")
    store = LocalStore(tmp_path / "store")
    store.put_bytes("k", b"v")
    for call, arg in ((store.list, "../"), (store.list, "../outside"), (store.exists, "../outside.txt")):
        try:
            answer = call(arg)
        except ValueError:
            continue  # refusing the prefix is a fine answer too
        assert not answer, f"{call.__name__}({arg!r}) = {answer!r}"


# --- the request log, written and read through each backend ---------------------------------


def _requests(start: datetime, n: int, step: timedelta, tag: str) -> pd.DataFrame:
    return pd.DataFrame({
        "request_id": [f"{tag}-{i}" for i in range(n)],
        "timestamp": [start + i * step for i in range(n)],
        "text": [f"text {tag} {i}" for i in range(n)],
        "predicted_label": ["balance"] * n,
        "confidence": [0.9] * n,
        "model_version": ["1"] * n,
        "extra": ["dropped"] * n,
    })


def test_inference_log_time_range_is_half_open(store):
    day1 = datetime(2026, 3, 1, 20, 0, tzinfo=timezone.utc)
    rows = _requests(day1, 10, timedelta(hours=5), "r")  # every 5 h from 20:00 on day 1 to 17:00 on day 3
    uris = requestlog.write_inference(store, "m", rows)
    assert len(uris) == 3  # one part per day spanned
    keys = store.list("inference/model=m/")
    assert [k.split("/")[2] for k in keys] == ["date=2026-03-01", "date=2026-03-02", "date=2026-03-03"]
    assert all(k.endswith(".parquet") for k in keys)

    # Exactly on r-2 (included) .. exactly on r-7 (excluded), across a day boundary.
    start, end = day1 + timedelta(hours=10), day1 + timedelta(hours=35)
    got = requestlog.read_inference(store, "m", start, end)
    assert got["request_id"].tolist() == ["r-2", "r-3", "r-4", "r-5", "r-6"]
    assert list(got.columns) == requestlog.INFERENCE_COLUMNS
    ts = pd.to_datetime(got["timestamp"], utc=True)
    assert (ts >= start).all() and (ts < end).all()

    everything = requestlog.read_inference(store, "m", day1, day1 + timedelta(days=3))
    assert len(everything) == 10
    assert requestlog.read_inference(store, "other-model", day1, day1 + timedelta(days=3)).empty
    none = requestlog.read_inference(store, "m", day1 + timedelta(days=10), day1 + timedelta(days=11))
    assert none.empty and list(none.columns) == requestlog.INFERENCE_COLUMNS


def test_inference_log_appends_parts(store):
    t0 = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)
    requestlog.write_inference(store, "m", _requests(t0, 3, timedelta(minutes=1), "a"))
    requestlog.write_inference(store, "m", _requests(t0 + timedelta(minutes=10), 2, timedelta(minutes=1), "b"))
    assert len(store.list("inference/model=m/date=2026-03-01/")) == 2
    got = requestlog.read_inference(store, "m", t0, t0 + timedelta(hours=1))
    assert sorted(got["request_id"]) == ["a-0", "a-1", "a-2", "b-0", "b-1"]


def test_labels_roundtrip(store):
    assert requestlog.read_labels(store, "m").empty
    assert list(requestlog.read_labels(store, "m").columns) == requestlog.LABEL_COLUMNS
    first = pd.DataFrame({"request_id": ["a", "b"], "label": ["x", "y"], "source": ["feedback"] * 2})
    second = pd.DataFrame({"request_id": ["c"], "label": ["z"], "source": ["feedback"], "junk": [1]})
    from datetime import date

    requestlog.write_labels(store, "m", first, day=date(2026, 3, 1))
    [key] = store.list("labels/")
    assert key.startswith("labels/model=m/date=2026-03-01/part-") and key.endswith(".parquet")
    requestlog.write_labels(store, "m", second)
    requestlog.write_labels(store, "other", first)
    got = requestlog.read_labels(store, "m").sort_values("request_id").reset_index(drop=True)
    assert list(got.columns) == requestlog.LABEL_COLUMNS
    assert got["request_id"].tolist() == ["a", "b", "c"]
    assert got["label"].tolist() == ["x", "y", "z"]


# --- opening a store from settings ----------------------------------------------------------


def test_open_store_local(tmp_path):
    store = open_store(Settings(home=tmp_path / "home"))
    store.put_bytes("k", b"v")
    assert (tmp_path / "home" / "store" / "k").read_bytes() == b"v"


def test_open_store_s3_creates_bucket(s3_endpoint):
    import uuid

    bucket = f"open-{uuid.uuid4().hex[:12]}"
    store = open_store(Settings(store="s3", s3_bucket=bucket, s3_endpoint_url=s3_endpoint))
    assert store.uri("k") == f"s3://{bucket}/k"
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


def test_open_store_unreachable_endpoint_names_it(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    endpoint = "http://127.0.0.1:1"
    with pytest.raises(RefitError) as info:
        open_store(Settings(store="s3", s3_bucket="nowhere", s3_endpoint_url=endpoint))
    assert endpoint in str(info.value)
    assert "not reachable" in str(info.value)


def test_create_writes_only_if_absent(store):
    assert store.create("locks/a.lock", b"first")
    assert not store.create("locks/a.lock", b"second")  # never overwrites
    assert store.get_bytes("locks/a.lock") == b"first"
    store.delete("locks/a.lock")
    assert store.create("locks/a.lock", b"third") and store.get_bytes("locks/a.lock") == b"third"


def test_create_is_never_seen_half_written_and_a_deleted_key_reads_as_missing(store):
    """A lock is read while others create and delete it: a reader sees all of it, or KeyError, nothing else.

    On the local store an O_EXCL open followed by a write let readers see an
    empty lock (the promotion-lock test failed on it once in CI), and a read
    racing a delete raised FileNotFoundError instead of KeyError.
    """
    import threading

    stop, partial, errors, reads = threading.Event(), [], [], []

    def reader() -> None:
        while not stop.is_set():
            try:
                data = store.get_bytes("locks/race.lock")
            except KeyError:
                continue
            except Exception as exc:  # noqa: BLE001 - any other error is the finding
                errors.append(repr(exc))
                return
            reads.append(len(data))
            if len(data) != 4096:
                partial.append(len(data))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(2000 if isinstance(store, LocalStore) else 30):
            assert store.create("locks/race.lock", b"x" * 4096)
            store.delete("locks/race.lock")
    finally:
        stop.set()
        thread.join()
    assert errors == [] and partial == [], (errors, partial, len(reads))


def test_promotion_lock_admits_one_holder_at_a_time(store):
    import threading
    import time

    from registry.versions import PromotionConflict, lock_key, promotion_lock

    inside, overlaps, order = [], [], []

    def promote(name: str) -> None:
        with promotion_lock(store, "m", name, wait_seconds=30):
            inside.append(name)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            order.append(name)
            time.sleep(0.3)
            inside.remove(name)

    threads = [threading.Thread(target=promote, args=(f"t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(order) == ["t0", "t1", "t2"] and overlaps == []
    assert not store.exists(lock_key("m"))  # released

    with promotion_lock(store, "m", "holder", wait_seconds=1):
        with pytest.raises(PromotionConflict, match="holds the lock: holder"):
            with promotion_lock(store, "m", "late", wait_seconds=0.5):
                pass
    # A crashed holder's lock is broken once it stayed unchanged for a whole lease, not waited on forever.
    store.put_bytes(lock_key("m"), b'{"holder": "crashed", "expires": 0}')
    started = time.monotonic()
    with promotion_lock(store, "m", "next", ttl_seconds=0.5, wait_seconds=120):  # a wait cut short only by a bug
        assert b"next" in store.get_bytes(lock_key("m"))
    assert time.monotonic() - started >= 0.5


def test_conditional_replace_and_delete_act_only_on_the_version_seen(store):
    """The compare-and-swap the promotion lock rests on: If-Match on S3, a flock'd compare on the directory."""
    assert store.create("locks/c.lock", b"mine")
    data, tag = store.get_versioned("locks/c.lock")
    assert data == b"mine"
    assert store.replace_if("locks/c.lock", b"renewed", tag)
    assert not store.replace_if("locks/c.lock", b"stale writer", tag)  # the version it saw is gone
    assert not store.delete_if("locks/c.lock", tag)
    assert store.get_bytes("locks/c.lock") == b"renewed"
    _, renewed = store.get_versioned("locks/c.lock")
    assert renewed != tag
    assert store.delete_if("locks/c.lock", renewed)
    assert not store.exists("locks/c.lock")
    assert not store.delete_if("locks/c.lock", renewed) and not store.replace_if("locks/c.lock", b"x", renewed)
    with pytest.raises(KeyError):
        store.get_versioned("locks/c.lock")
    assert store.list("locks/") == []  # the local store's flock guard is not an object


class WaiterClock:
    """registry.versions' clock, logical for the waiting thread: each of its sleeps jumps two leases, but only
    once the holder has written a renewal after the waiter's last read of the lock (or has released it).

    Every poll of the waiter therefore comes long past the lease it watched, and a holder that keeps renewing
    must keep the lock however long that is: no margin of the real clock is involved, however loaded the
    machine. The holder's renewer keeps the real clock (it waits on an Event, not on this).
    """

    def __init__(self, waiter: str, lease: float, enough_polls: int):
        import threading
        import time

        self.real, self.waiter, self.jump, self.enough_polls = time, waiter, 2 * lease, enough_polls
        self.offset, self.renewals, self.seen_at_read, self.polls, self.released = 0.0, 0, 0, 0, False
        self.changed, self.enough, self.problems = threading.Condition(), threading.Event(), []

    def _waiting(self) -> bool:
        import threading

        return threading.current_thread().name == self.waiter

    def monotonic(self) -> float:
        return self.real.monotonic() + (self.offset if self._waiting() else 0.0)

    def time(self) -> float:
        return self.real.time() + (self.offset if self._waiting() else 0.0)

    def sleep(self, seconds: float) -> None:
        if not self._waiting():
            return self.real.sleep(seconds)
        with self.changed:
            if not self.changed.wait_for(lambda: self.renewals > self.seen_at_read or self.released, timeout=60):
                self.problems.append("the holder wrote no renewal for 60 s")
            self.offset += self.jump
            self.polls += 1
        if self.polls >= self.enough_polls:
            self.enough.set()

    def spy(self, store, key: str) -> None:
        """Count the holder's renewals and note the waiter's reads of ``key`` (the real calls, unchanged)."""
        write, read = store.replace_if, store.get_versioned

        def replace_if(k, *args):
            written = write(k, *args)
            if written and k == key:
                with self.changed:
                    self.renewals += 1
                    self.changed.notify_all()
            return written

        def get_versioned(k, *args):
            if k == key and self._waiting():
                with self.changed:
                    self.seen_at_read = self.renewals
            return read(k, *args)

        object.__setattr__(store, "replace_if", replace_if)
        object.__setattr__(store, "get_versioned", get_versioned)

    def release(self) -> None:
        with self.changed:
            self.released = True
            self.changed.notify_all()


def test_a_live_holder_past_its_lease_is_never_broken(store, monkeypatch):
    """A holder that keeps its lease (renewals) keeps the lock however long it holds it and whatever any clock
    says; before, a waiter broke any lock whose wall-clock expiry had passed, and two holders overlapped.

    The waiter's clock is logical (``WaiterClock``): it polls six times, each two leases after the last.
    """
    import threading

    from registry import versions
    from registry.versions import lock_key, promotion_lock

    lease = 0.6
    clock = WaiterClock("next", lease, enough_polls=6)
    clock.spy(store, lock_key("m"))
    monkeypatch.setattr(versions, "time", clock)
    inside, overlaps, held = [], [], threading.Event()

    def hold(name: str) -> None:
        with promotion_lock(store, "m", name, ttl_seconds=lease, wait_seconds=600):
            inside.append(name)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            held.set()
            if name == "long" and not clock.enough.wait(120):
                clock.problems.append("the waiter stopped polling")
            inside.remove(name)
        if name == "long":
            clock.release()

    first = threading.Thread(target=hold, args=("long",), name="long")
    first.start()
    assert held.wait(60)
    second = threading.Thread(target=hold, args=("next",), name="next")
    second.start()
    first.join(180)
    second.join(180)
    assert not first.is_alive() and not second.is_alive()
    assert overlaps == [] and clock.problems == [], (overlaps, clock.problems)
    assert clock.offset >= 6 * 2 * lease  # the waiter watched the holder for ten leases and more of its clock


def test_a_lock_whose_holder_died_is_broken_whatever_its_clock_claimed(store):
    """A dead holder whose clock ran an hour ahead wrote an expiry far in the future: the waiter's own
    monotonic watch breaks it after one lease, instead of waiting out the other machine's clock."""
    import time

    from registry.versions import lock_key, promotion_lock

    store.put_bytes(lock_key("m"), json.dumps({"holder": "dead, clock ahead", "expires": time.time() + 3600,
                                               "lease_seconds": 0.5}).encode())
    with promotion_lock(store, "m", "next", ttl_seconds=0.5, wait_seconds=120):  # a wait cut short only by a bug
        assert b"next" in store.get_bytes(lock_key("m"))


def test_two_waiters_break_an_expired_lock_once_and_never_delete_each_others(store):
    """Two waiters read the same dead holder's lock at the same moment (lined up on their first read of it)
    and both decide to break it. Before, both deleted it, and the slower one deleted the lock the faster one
    had just taken; now the break is a delete of the version seen, which only one of them wins."""
    import threading
    import time

    from registry.versions import lock_key, promotion_lock

    key = lock_key("m")
    lined_up, first_read = threading.Barrier(2, timeout=10), threading.local()

    def line_up(read):  # a real read, but each waiter's first one waits for the other's
        def wrapped(k, *args):
            result = read(k, *args)
            if k == key and not getattr(first_read, "done", False):
                first_read.done = True
                lined_up.wait()
            return result
        return wrapped

    for name in ("get_bytes", "get_versioned"):
        if hasattr(store, name):  # (the code before had get_bytes only)
            object.__setattr__(store, name, line_up(getattr(store, name)))
    store.put_bytes(key, json.dumps({"holder": "crashed", "expires": 0, "lease_seconds": 0.3}).encode())
    inside, overlaps, done = [], [], []

    def wait_and_hold(name: str) -> None:
        # Their own leases are long (30 s): only the dead holder's short one (0.3 s) may be broken here.
        with promotion_lock(store, "m", name, ttl_seconds=30, wait_seconds=120):
            inside.append(name)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            time.sleep(0.25)
            inside.remove(name)
            done.append(name)

    threads = [threading.Thread(target=wait_and_hold, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [] and sorted(done) == ["w0", "w1"], (overlaps, done)
    assert not store.exists(key)


def test_a_holder_whose_lock_was_broken_is_fenced_and_releases_nothing(store):
    """A paused holder (its lock broken and taken by another) learns so before any write, and its release
    leaves the new holder's lock in place."""
    from registry.versions import PromotionConflict, lock_key, promotion_lock

    with promotion_lock(store, "m", "paused", ttl_seconds=30, wait_seconds=1) as stale:
        stale.verify()  # still ours
        store.delete(lock_key("m"))  # what a waiter does after watching it unchanged for a lease
        with promotion_lock(store, "m", "new", ttl_seconds=30, wait_seconds=1) as fresh:
            assert fresh.number > stale.number  # fencing numbers only grow
            with pytest.raises(PromotionConflict, match="lost the promotion lock"):
                stale.verify()
            assert not stale.release()
            assert b'"new"' in store.get_bytes(lock_key("m"))
            fresh.verify()
    assert not store.exists(lock_key("m"))


def test_label_batch_far_from_the_models_predictions_is_quarantined_whole(store):
    """Delayed labels that mostly name one intent, whatever was asked: refused and kept in quarantine."""
    from datetime import datetime, timedelta, timezone

    from refit import requestlog
    from refit.errors import RefitError
    from tasks.ingest import labelled_window

    start = datetime(2026, 11, 1, 12, tzinfo=timezone.utc)
    intents = [f"intent{i}" for i in range(10)]
    served = pd.DataFrame({
        "request_id": [f"r{i}" for i in range(100)],
        "timestamp": [start + timedelta(seconds=i) for i in range(100)],
        "text": [f"text {i}" for i in range(100)],
        "predicted_label": [intents[i % 10] for i in range(100)],
        "confidence": 0.9, "model_version": "1"})
    requestlog.write_inference(store, "m", served)
    honest = served[["request_id"]].assign(label=served["predicted_label"], source="support")
    honest.loc[:19, "label"] = "intent0"  # a fifth relabelled: real feedback differs from predictions
    requestlog.write_labels(store, "m", honest)
    end = start + timedelta(hours=1)
    kept = labelled_window(store, "m", start, end, known_labels=intents, max_label_mix_shift=0.85)
    assert len(kept) == 100

    broken = served[["request_id"]].assign(label="intent3", source="labelling-job")  # everything one intent
    requestlog.write_labels(store, "m", broken)
    with pytest.raises(RefitError, match=r"label batch rejected: label mix moved 0\.9\d\d"):
        labelled_window(store, "m", start, end, known_labels=intents, max_label_mix_shift=0.85)
    (quarantined,) = [k for k in store.list("quarantine/model=m/labels/") if k.endswith("-batch.parquet")]
    frame = store.get_parquet(quarantined)
    assert len(frame) == 100 and frame["reason"].str.contains("label mix moved").all()
    # A batch refused whole stays out of every later join, checked or not: an episode never stalls on it.
    assert len(labelled_window(store, "m", start, end, known_labels=intents)) == 0


def test_labels_refit_asked_for_are_not_judged_by_the_label_mix_guard(store):
    """Requests picked for being unsure disagree with the model by design; the guard judges only the rest."""
    from refit import requestlog
    from tasks.ingest import labelled_window

    start = datetime(2026, 11, 2, 12, tzinfo=timezone.utc)
    intents = [f"intent{i}" for i in range(10)]
    served = pd.DataFrame({
        "request_id": [f"q{i}" for i in range(100)], "timestamp": [start + timedelta(seconds=i) for i in range(100)],
        "text": [f"asked {i}" for i in range(100)], "predicted_label": [intents[i % 10] for i in range(100)],
        "confidence": 0.3, "model_version": "1"})
    requestlog.write_inference(store, "m", served)
    requestlog.write_labels(store, "m", served[["request_id"]].assign(label="intent3", source="asked"))
    store.put_parquet("labels/model=m/requested/ask.parquet", served[["request_id"]].assign(episode="e", cluster=0))
    kept = labelled_window(store, "m", start, start + timedelta(hours=1), known_labels=intents, max_label_mix_shift=0.85)
    assert len(kept) == 100 and set(kept["label"]) == {"intent3"}
    store.delete("labels/model=m/requested/ask.parquet")  # the same labels, never asked for: a broken job
    with pytest.raises(Exception, match="label batch rejected"):
        labelled_window(store, "m", start, start + timedelta(hours=1), known_labels=intents, max_label_mix_shift=0.85)
