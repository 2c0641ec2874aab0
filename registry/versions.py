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
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
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
    current = alias_version(model_name, CHAMPION)
    if current == version and expected_champion is not None and alias_version(model_name, PREVIOUS) == expected_champion:
        return expected_champion  # this promotion already happened (a retry after a lost answer)
    if current != expected_champion:
        raise PromotionConflict(
            f"champion of {model_name} is v{current}, not v{expected_champion} that v{version} was gated against"
        )
    if lease is not None:
        lease.fence(model_name)
    if current is not None:
        set_alias(model_name, PREVIOUS, current)
    set_alias(model_name, CHAMPION, version)
    return current


def lock_key(model_name: str) -> str:
    return f"locks/model={model_name}/promotion.lock"


def fence_prefix(model_name: str) -> str:
    return f"locks/model={model_name}/fence/"


FENCE_TAG = "refit.promotion_fence"
LEASE_SECONDS = 30.0


class LockBusy(PromotionConflict):
    """The promotion lock stayed held by a live holder for as long as we could wait: try again later."""


@dataclass
class Lease:
    """A held promotion lock: its token, its fencing number and the version of the lock object we wrote last.

    ``fence`` is the number this holder claimed after taking the lock; numbers
    only grow, so a holder whose lock was broken (a paused process) carries a
    smaller one than whoever holds the lock now.
    """

    store: object
    key: str
    token: str
    number: int
    tag: str
    body: dict
    lost: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def verify(self) -> None:
        """Raise ``PromotionConflict`` unless the lock object is still this holder's."""
        if self.lost:
            raise PromotionConflict(f"lost the promotion lock ({self.lost}); nothing was written")
        try:
            held = json.loads(self.store.get_bytes(self.key))
        except KeyError:
            raise PromotionConflict("lost the promotion lock (it is gone: broken as expired?); nothing was written") from None
        except ValueError:
            held = {}
        if held.get("token") != self.token:
            raise PromotionConflict(f"lost the promotion lock to {held.get('holder')!r}; nothing was written")

    def fence(self, model_name: str) -> None:
        """Check the token at the alias write: the lock is still ours, and no later holder wrote the registry.

        The registered model's tag ``refit.promotion_fence`` keeps the highest
        fencing number that has written its aliases; a smaller one is refused.
        MLflow has no conditional write, so the check and the alias write that
        follows are two calls: the gap left is one MLflow round trip, not a lease.
        """
        self.verify()
        client = MlflowClient()
        written = client.get_registered_model(model_name).tags.get(FENCE_TAG)
        if written is not None and written.isdigit() and int(written) > self.number:
            raise PromotionConflict(f"a later promotion of {model_name} (fence {written}) already wrote the aliases; "
                                    f"this one (fence {self.number}) is stale and wrote nothing")
        if written != str(self.number):
            client.set_registered_model_tag(model_name, FENCE_TAG, str(self.number))

    def renew(self) -> bool:
        """Rewrite the lock (a new version of the object), which restarts every waiter's watch; False if lost."""
        with self._lock:
            if self.lost:
                return False
            body = self.body | {"renewals": self.body.get("renewals", 0) + 1}
            try:
                renewed = self.store.replace_if(self.key, json.dumps(body).encode(), self.tag)
            except Exception as exc:  # the store is unreachable: keep the lease, waiters see no change either
                log.warning("renewing the promotion lock failed: %s", exc)
                return True
            if not renewed:
                self.lost = "another holder broke it while it was held"
                return False
            self.body, self.tag = body, self.store.get_versioned(self.key)[1]
            return True

    def release(self) -> bool:
        """Delete the lock only if it is still the version we wrote: never someone else's."""
        with self._lock:
            if self.lost:
                return False
            self.lost = "released"
            return self.store.delete_if(self.key, self.tag)


def _claim_fence(store, model_name: str, token: str) -> int:
    """The next fencing number: a marker object created only if absent, so no two holders share one."""
    prefix = fence_prefix(model_name)
    while True:
        keys = store.list(prefix)
        numbers = sorted(int(k.rsplit("/", 1)[1]) for k in keys if k.rsplit("/", 1)[1].isdigit())
        number = numbers[-1] + 1 if numbers else 1
        if store.create(f"{prefix}{number:012d}", token.encode()):
            for old in numbers[:-1]:  # keep the last two; the counter only needs its top
                store.delete(f"{prefix}{old:012d}")
            return number


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
    key = lock_key(model_name)
    token = uuid.uuid4().hex
    body = {"holder": holder, "token": token, "lease_seconds": ttl_seconds, "renewals": 0}
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
    _, tag = store.get_versioned(key)
    number = _claim_fence(store, model_name, token)
    held = Lease(store, key, token, number, tag, body)
    faults.point("lock.acquired")
    stop = threading.Event()
    renewer = threading.Thread(target=_keep_renewed, args=(held, ttl_seconds / 3, stop), daemon=True,
                               name=f"lease-{model_name}")
    renewer.start()
    try:
        yield held
    finally:
        stop.set()
        renewer.join()
        try:
            held.release()
        except Exception as exc:  # the store is down: the lock lapses after its lease, as a crashed holder's
            log.warning("releasing the promotion lock of %s failed (%s); it will be broken after %.0f s",
                        model_name, exc, ttl_seconds)


def _parse_lock(data: bytes) -> dict:
    try:
        held = json.loads(data)
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def _keep_renewed(lease: Lease, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        if not lease.renew():
            log.warning("the promotion lock was broken while held: %s", lease.lost)
            return


def require_safetensors(adapter_dir: Path) -> Path:
    """``adapter_dir`` if its weights are safetensors only; ``RefitError`` if any pickle-format file is there.

    A ``.bin``/``.pt``/``.pkl`` file would be unpickled by a loader that falls
    back to it; refit writes safetensors only, so such a file is refused, not
    loaded.
    """
    adapter_dir = Path(adapter_dir)
    pickled = sorted(p.name for p in adapter_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise RefitError(f"adapter {adapter_dir} holds pickle-format weights ({', '.join(pickled)}); "
                         "refit loads safetensors only")
    if not any(adapter_dir.glob("*.safetensors")):
        raise RefitError(f"adapter {adapter_dir} has no .safetensors weights; refit loads safetensors only")
    return adapter_dir


def download_adapter(model_name: str, version: int) -> Path:
    """Local directory holding the version's adapter files."""
    source = MlflowClient().get_model_version(model_name, str(version)).source
    return require_safetensors(Path(mlflow.artifacts.download_artifacts(artifact_uri=source)))
