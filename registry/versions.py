"""Model versions and aliases: the registry side of promotion and rollback.

A version's source is the run's ``adapter/`` artifact directory (safetensors
plus a label list), registered directly, so nothing is ever unpickled.
Aliases: ``champion`` serves, ``previous`` is what rollback returns to,
``challenger`` is the newest candidate.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from refit import faults
from refit.errors import RefitError

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
ADAPTER_DIR = "adapter"
log = logging.getLogger("refit.registry")


class PromotionConflict(RefitError):
    """The champion moved between evaluation and promotion."""


def alias_version(model_name: str, alias: str) -> int | None:
    """The version number behind ``alias``, or None if unset or no such model."""
    try:
        return int(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def register(model_name: str, run_id: str, tags: dict[str, str]) -> int:
    """Register the run's adapter as a new version carrying ``tags``."""
    client = MlflowClient()
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(
            model_name, description="Text classifier kept fresh by refit: LoRA adapters over its base model (tag refit.base_model_uri)."
        )
    source = f"{client.get_run(run_id).info.artifact_uri}/{ADAPTER_DIR}"
    version = client.create_model_version(model_name, source=source, run_id=run_id,
                                          tags={k: str(v)[:5000] for k, v in tags.items()})
    return int(version.version)


def set_tags(model_name: str, version: int, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, str(value)[:5000])


def version_tags(model_name: str, version: int) -> dict[str, str]:
    return dict(MlflowClient().get_model_version(model_name, str(version)).tags)


def set_alias(model_name: str, alias: str, version: int) -> None:
    MlflowClient().set_registered_model_alias(model_name, alias, str(version))


def repair_deployed_tags(model_name: str) -> list[int]:
    """Tag ``champion`` and ``previous`` as deployed where a promotion stopped after moving the alias; their numbers.

    The alias is the truth and the ``refit.deployed`` tag its record: a
    promotion killed between the two (or whose later steps failed, which
    tagged it abandoned) leaves a served version whose page does not say so.
    Every update repairs that first. A version tagged ``rolled back`` is left
    as it is.
    """
    repaired = []
    for alias in (CHAMPION, PREVIOUS):
        version = alias_version(model_name, alias)
        if version is None:
            continue
        deployed = version_tags(model_name, version).get("refit.deployed", "")
        if deployed == "" or deployed.startswith("abandoned"):
            set_tags(model_name, version, {"refit.deployed": "champion",
                                           "refit.deployed_repaired": f"was {deployed or 'untagged'!r} while {alias}"})
            repaired.append(version)
    return repaired


def promote(model_name: str, version: int, expected_champion: int | None, lease: Lease | None = None) -> int | None:
    """Make ``version`` the champion if the champion is still ``expected_champion``.

    The old champion becomes ``previous``. Returns the old champion.
    Raises ``PromotionConflict`` if another promotion got there first, so a
    gate verdict is never applied to a champion it did not compare against.
    With ``lease`` (what ``promotion_lock`` yields) the alias write is fenced:
    refused if the lock is no longer this holder's, or if a later holder has
    already written (``Lease.fence``).
    """
    if check_promotion(model_name, version, expected_champion):
        return expected_champion  # this promotion already happened (a retry after a lost answer)
    if lease is not None:
        lease.fence(model_name)
    if expected_champion is not None:
        set_alias(model_name, PREVIOUS, expected_champion)
    set_alias(model_name, CHAMPION, version)
    return expected_champion


def check_promotion(model_name: str, version: int, expected_champion: int | None, lease: Lease | None = None) -> bool:
    """Whether ``promote`` would find the promotion done already; raises what it would refuse with. Writes nothing.

    Lets a promotion do the work that must precede the alias move (growing
    the golden suite) only once the move is known to be allowed.
    """
    current = alias_version(model_name, CHAMPION)
    if current == version and expected_champion is not None \
            and alias_version(model_name, PREVIOUS) == expected_champion:
        return True
    if current != expected_champion:
        raise PromotionConflict(
            f"champion of {model_name} is v{current}, not v{expected_champion} that v{version} was gated against"
        )
    if lease is not None:
        lease.check(model_name)
    return False


def lock_key(model_name: str) -> str:
    return f"locks/model={model_name}/promotion.lock"


def fence_prefix(model_name: str) -> str:
    return f"locks/model={model_name}/fence/"


def fence_mark_key(model_name: str) -> str:
    """The highest fencing number that has written the model's aliases: beside the counter, in the same store."""
    return f"locks/model={model_name}/fence.written"


LEASE_SECONDS = 30.0


class LockBusy(PromotionConflict):
    """The promotion lock stayed held by a live holder for as long as we could wait: try again later."""


class LeaseLost(LockBusy):
    """This holder's lock was broken, or a later holder already wrote the aliases: nothing was written.

    A ``LockBusy``: whoever retries on a busy lock (the server's automatic
    rollback) retries this too, with a fresh lock and a fresh fencing number,
    rather than taking it for "the champion moved on" and leaving a bad
    version serving.
    """


def read_fence_mark(store, model_name: str) -> tuple[int, str | None]:
    """(the highest fencing number that wrote the aliases, the version of its object); (0, None) if none has."""
    try:
        data, tag = store.get_versioned(fence_mark_key(model_name))
    except KeyError:
        return 0, None
    text = data.decode(errors="replace").strip()
    return (int(text) if text.isdigit() else 0), tag


@dataclass
class Lease:
    """A held promotion lock: its token, its fencing number and the version of the lock object we wrote last.

    ``number`` is the fencing number this holder claimed after taking the lock; numbers
    only grow, so a holder whose lock was broken (a paused process) carries a
    smaller one than whoever holds the lock now. ``unsure`` is set when a
    write's answer was lost (or the read after it failed): ``tag`` may then
    not be the lock's version, and the next renewal re-reads the lock first.
    """

    store: object
    key: str
    token: str
    number: int
    tag: str | None
    body: dict
    lost: str | None = None
    unsure: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def verify(self) -> None:
        """Raise ``LeaseLost`` unless the lock object is still this holder's."""
        if self.lost:
            raise LeaseLost(f"lost the promotion lock ({self.lost}); nothing was written")
        with self._lock:
            self._reread()
        if self.lost:
            raise LeaseLost(f"lost the promotion lock ({self.lost}); nothing was written")

    def check(self, model_name: str) -> None:
        """``verify``, and no later holder wrote the aliases (``fence``'s check, writing nothing)."""
        self.verify()
        written, _ = read_fence_mark(self.store, model_name)
        if written > self.number:
            raise LeaseLost(f"a later promotion of {model_name} (fence {written}) already wrote the aliases; "
                            f"this one (fence {self.number}) is stale and wrote nothing")

    def fence(self, model_name: str) -> None:
        """Check the token at the alias write: the lock is still ours, and no later holder wrote the registry.

        The store keeps, beside the counter the numbers come from, the highest
        number that has written the aliases (``fence_mark_key``), raised with a
        conditional write; a smaller one is refused. Counter and mark live and
        move together, so a registry pointed at a new or restored store starts
        both afresh instead of refusing every promotion as stale. MLflow has
        no conditional write, so the check and the alias write that follows
        are two calls: the gap left is one MLflow round trip, not a lease.
        """
        self.verify()
        key = fence_mark_key(model_name)
        while True:
            written, tag = read_fence_mark(self.store, model_name)
            if written > self.number:
                raise LeaseLost(f"a later promotion of {model_name} (fence {written}) already wrote the aliases; "
                                f"this one (fence {self.number}) is stale and wrote nothing")
            if written == self.number:
                return
            mark = str(self.number).encode()
            if self.store.create(key, mark) if tag is None else self.store.replace_if(key, mark, tag):
                return  # (else another holder moved the mark meanwhile: look again)

    def renew(self) -> bool:
        """Rewrite the lock (a new version of the object), which restarts every waiter's watch; False once lost.

        A store error is not a loss: the renewer logs it and tries again at
        its next tick, for as long as the lock is held, since every write is
        conditional and cannot take a lock that is no longer ours. The lock is
        lost only when a read shows it gone or another holder's.
        """
        with self._lock:
            if self.lost:
                return False
            try:
                self._rewrite()
            except Exception as exc:  # unreachable, or the answer lost: the next tick re-reads what is there
                self.unsure = True
                log.warning("renewing the promotion lock failed (%s: %s); trying again", type(exc).__name__, exc)
            return self.lost is None

    def _rewrite(self) -> None:
        """One renewal; after a refused write, re-read the lock: ours if an earlier write of ours landed unseen."""
        for _ in range(2):
            if self.unsure:
                self._reread()
                if self.lost:
                    return
            body = self.body | {"renewals": int(self.body.get("renewals", 0)) + 1}
            faults.point("lease.renew")
            self.unsure = True  # until the store's answer is in and the new version read back
            if self.store.replace_if(self.key, json.dumps(body).encode(), self.tag):
                faults.point("lease.renew_written")
                self.body = body
                self._reread()  # what it wrote, checked: the holder and token, and the version's tag
                return
        self._reread()

    def _reread(self) -> None:
        """Learn the lock's version if it is still ours (its token); mark the lease lost if it is gone or not ours."""
        try:
            data, tag = self.store.get_versioned(self.key)
        except KeyError:
            self.lost = "it is gone: broken as expired?"
            return
        held = _parse_lock(data)
        if held.get("token") != self.token:
            self.lost = f"taken by {held.get('holder')!r}"
            return
        self.body, self.tag, self.unsure = held, tag, False

    def release(self) -> bool:
        """Delete the lock only if it is still the version we wrote: never someone else's."""
        with self._lock:
            if self.lost:
                return False
            if self.unsure:
                self._reread()
                if self.lost:
                    return False
            self.lost = "released"
            if self.store.delete_if(self.key, self.tag):
                return True
            self.lost = None
            self._reread()  # an earlier write of ours landed unseen: delete the version that is there
            if self.lost:
                return False
            self.lost = "released"
            return self.store.delete_if(self.key, self.tag)


def _claim_fence(store, model_name: str, token: str) -> int:
    """The next fencing number: a marker object created only if absent, so no two holders share one.

    Above both the counter's top and the mark of the last number that wrote
    the aliases, so a counter lost on its own (markers deleted, the mark
    kept) still hands out a number the fence accepts.
    """
    prefix = fence_prefix(model_name)
    while True:
        keys = store.list(prefix)
        numbers = sorted(int(k.rsplit("/", 1)[1]) for k in keys if k.rsplit("/", 1)[1].isdigit())
        number = max(numbers[-1] if numbers else 0, read_fence_mark(store, model_name)[0]) + 1
        if store.create(f"{prefix}{number:012d}", token.encode()):
            for old in numbers[:-1]:  # keep the last two; the counter only needs its top
                store.delete(f"{prefix}{old:012d}")
            return number


def forget_fence(store, model_name: str, keep_mark: bool = False) -> list[str]:
    """Delete the model's fencing counter (and its mark unless ``keep_mark``): a new or restored store. Its keys.

    For fault benchmarks and tests: what a registry meets when it is pointed
    at a store that never saw its promotions.
    """
    keys = store.list(fence_prefix(model_name)) + ([] if keep_mark else [fence_mark_key(model_name)])
    for key in keys:
        store.delete(key)
    return keys


@contextmanager
def promotion_lock(store, model_name: str, holder: str, ttl_seconds: float = LEASE_SECONDS,
                   wait_seconds: float = 60) -> Iterator[Lease]:
    """Hold the model's promotion lock: one promotion (or rollback) at a time per model. Yields a ``Lease``.

    The lock is an object created only if absent (``ObjectStore.create``: a
    hard link on the local directory, ``If-None-Match: *`` on S3), so it works
    across processes and machines that share the store. No wall clock is
    trusted: the holder rewrites the lock every third of its lease
    (``ttl_seconds``), and a waiter breaks it only after watching the *same
    version* of it, unchanged, for a whole lease on its own monotonic clock.
    Breaking and releasing are conditional deletes (``If-Match`` the version
    seen), so two waiters cannot both break one lock, and nobody deletes a
    lock taken after the one they saw. Waits up to ``wait_seconds``, then
    raises ``LockBusy`` naming the holder. Pass the lease to ``promote`` to
    fence the alias write.
    """
    token = uuid.uuid4().hex
    body = {"holder": holder, "token": token, "lease_seconds": ttl_seconds, "renewals": 0}
    _take_lock(store, model_name, body, ttl_seconds, wait_seconds)
    held = Lease(store, lock_key(model_name), token, 0, None, body, unsure=True)  # its version: read below
    stop = threading.Event()
    renewer = threading.Thread(target=_keep_renewed, args=(held, ttl_seconds / 3, stop), daemon=True,
                               name=f"lease-{model_name}")
    renewer.start()
    try:
        held.verify()
        held.number = _claim_fence(store, model_name, token)
        faults.point("lock.acquired")
        yield held
    finally:
        stop.set()
        renewer.join()
        try:
            held.release()
        except Exception as exc:  # the store is down: the lock lapses after its lease, as a crashed holder's
            log.warning("releasing the promotion lock of %s failed (%s); it will be broken after %.0f s",
                        model_name, exc, ttl_seconds)


def _take_lock(store, model_name: str, body: dict, ttl_seconds: float, wait_seconds: float) -> None:
    """Create the lock object, breaking one left unchanged for a whole lease; ``LockBusy`` after ``wait_seconds``."""
    key = lock_key(model_name)
    deadline = time.monotonic() + wait_seconds
    seen: tuple[str, float] | None = None  # (version of the lock we watch, since when on our clock)
    while not store.create(key, json.dumps(body).encode()):
        try:
            data, tag = store.get_versioned(key)
        except KeyError:
            continue  # released between our attempt and the read
        held = _parse_lock(data)
        lease = held.get("lease_seconds")
        lease = float(lease) if isinstance(lease, (int, float)) and lease > 0 else ttl_seconds
        now = time.monotonic()
        if seen is None or seen[0] != tag:
            seen = (tag, now)
        elif now - seen[1] >= lease:
            if store.delete_if(key, tag):
                log.warning("broke the promotion lock of %s held by %r: unchanged for %.0f s (its lease)",
                            model_name, held.get("holder"), now - seen[1])
            seen = None
            continue
        if now > deadline:
            raise LockBusy(f"another promotion of {model_name} holds the lock: {held.get('holder')}")
        time.sleep(min(0.5, max(0.05, lease / 10)))


def _parse_lock(data: bytes) -> dict:
    try:
        held = json.loads(data)
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def _keep_renewed(lease: Lease, every: float, stop: threading.Event) -> None:
    """Renew until released or known lost; an error of any kind is logged and retried, never the end of it."""
    while not stop.wait(every):
        try:
            kept = lease.renew()
        except Exception:  # renew catches the store's errors; anything else must not end the renewals either
            log.exception("renewing the promotion lock failed")
            continue
        if not kept:
            if lease.lost != "released":
                log.warning("the promotion lock was broken while held: %s", lease.lost)
            return


def download_adapter(model_name: str, version: int) -> Path:
    """Local directory holding the version's adapter files."""
    source = MlflowClient().get_model_version(model_name, str(version)).source
    from refit import modeling  # torch: only where an adapter is fetched

    return modeling.require_safetensors(Path(mlflow.artifacts.download_artifacts(artifact_uri=source)))
