"""What a server records in the registry about its rollouts, and how a write that fails is retried.

The server acts in memory first (the old version answers at once) and then
makes the registry agree: an automatic rollback moves the aliases, a passed
canary tags its version (``WATCHED_TAG``) so a restarted server adopts it
directly, a cascade whose student stopped answering is recorded. MLflow or
the store may be down at that moment, so each write is kept and retried
until it lands (``RegistryWrites``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timezone

from refit.errors import RefitError
from refit.secrets import mask_uri
from refit.store import ObjectStore
from serving.guards import GuardVerdict, RolloutPolicy

log = logging.getLogger("refit.serving")
# Tag on a version that passed a canary and its watch on some server: a restarted server adopts it directly.
WATCHED_TAG = "refit.canary"


class RegistryWrites:
    """Registry writes this server still has to make, by what each records; tried at once, retried until they land.

    ``submit`` tries a write in the background; one that fails stays
    ``pending`` and ``retry_all`` (the server's retry loop) tries it again.
    One try of each write at a time: the retry loop and a fresh try never race.
    """

    def __init__(self, retry_seconds: float):
        self.retry_seconds = retry_seconds
        self._writes: dict[str, tuple[Callable, tuple]] = {}  # what -> (function, its arguments)
        self._lock = asyncio.Lock()
        self._trying: set[asyncio.Task] = set()

    @property
    def pending(self) -> list[str]:
        """What the writes not landed yet record, sorted."""
        return sorted(self._writes)

    def submit(self, what: str, function: Callable, *args) -> None:
        """Try ``function(*args)`` now in the background; if it fails, keep it for ``retry_all``."""
        self._writes[what] = (function, args)
        task = asyncio.get_running_loop().create_task(self._try(what))
        self._trying.add(task)
        task.add_done_callback(self._trying.discard)

    async def _try(self, what: str) -> None:
        async with self._lock:
            if what not in self._writes:
                return
            function, args = self._writes[what]
            try:
                await asyncio.to_thread(function, *args)
            except Exception as exc:  # MLflow or the store down, the lock busy: keep it, retry later
                log.warning("%s not written to the registry yet (%s: %s); retrying every %g s", what,
                            type(exc).__name__, mask_uri(str(exc))[:300], self.retry_seconds)
                return
            self._writes.pop(what, None)

    async def retry_all(self) -> None:
        for what in list(self._writes):
            await self._try(what)

    async def wait(self) -> None:
        """Wait for the tries under way (a stopping server lets them finish)."""
        await asyncio.gather(*list(self._trying), return_exceptions=True)


def record_rollback(model_name: str, verdict: GuardVerdict, phase: str, restored: int, policy: RolloutPolicy,
                    experiment_id: str | None, store: ObjectStore) -> None:
    """Move the aliases back and record why; raises on an outage (so it is retried), not on a conflict."""
    from registry.rollout import roll_back
    from registry.versions import LockBusy

    title = f"Automatic rollback of {model_name} v{verdict.new_version} ({phase})"
    try:
        result = roll_back(model_name, verdict.new_version, f"guard failed during {phase}: {verdict.summary}",
                           experiment_id=experiment_id, store=store,
                           source=f"refit serve ({phase} guard)", restore_to=restored,
                           guard_html=verdict.html(title), guard_markdown=f"# {title}\n\n{verdict.markdown()}",
                           guard_json=verdict.to_dict() | {"policy": policy.model_dump()})
        log.warning("rolled back in MLflow: %s", result)
    except LockBusy:
        raise  # a promotion holds the lock: try again later
    except RefitError as exc:  # the champion moved on meanwhile: nothing of ours to undo
        log.warning("rollback of v%d not recorded in MLflow: %s", verdict.new_version, exc)


def watched_tags(baseline: int) -> dict[str, str]:
    """The tag of a version that passed its canary and watch against ``baseline`` now: a restart need not redo it."""
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {WATCHED_TAG: f"passed against v{baseline} at {when}"}
