"""Model versions and aliases: the registry side of promotion and rollback.

A version's source is the run's ``adapter/`` artifact directory (safetensors
plus a label list), registered directly, so nothing is ever unpickled.
Aliases: ``champion`` serves, ``previous`` is what rollback returns to,
``challenger`` is the newest candidate.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from refit.errors import RefitError

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
ADAPTER_DIR = "adapter"


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
            model_name, description="Intent classifier kept fresh by refit: LoRA adapters over all-MiniLM-L6-v2."
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


def promote(model_name: str, version: int, expected_champion: int | None) -> int | None:
    """Make ``version`` the champion if the champion is still ``expected_champion``.

    The old champion becomes ``previous``. Returns the old champion.
    Raises ``PromotionConflict`` if another promotion got there first, so a
    gate verdict is never applied to a champion it did not compare against.
    """
    current = alias_version(model_name, CHAMPION)
    if current == version and expected_champion is not None and alias_version(model_name, PREVIOUS) == expected_champion:
        return expected_champion  # this promotion already happened (a retry after a lost answer)
    if current != expected_champion:
        raise PromotionConflict(
            f"champion of {model_name} is v{current}, not v{expected_champion} that v{version} was gated against"
        )
    if current is not None:
        set_alias(model_name, PREVIOUS, current)
    set_alias(model_name, CHAMPION, version)
    return current


def lock_key(model_name: str) -> str:
    return f"locks/model={model_name}/promotion.lock"


@contextmanager
def promotion_lock(store, model_name: str, holder: str, ttl_seconds: float = 600,
                   wait_seconds: float = 60) -> Iterator[None]:
    """Hold the model's promotion lock: one promotion (or rollback) at a time per model.

    The lock is an object created only if absent (``ObjectStore.create``:
    O_EXCL on the local directory, a conditional put on S3), so it works
    across processes and machines that share the store. A lock older than
    ``ttl_seconds`` is taken to be a crashed holder's and broken. Waits up to
    ``wait_seconds``, then raises ``PromotionConflict`` naming the holder.
    """
    key = lock_key(model_name)
    token = f"{holder} {uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_seconds
    while not store.create(key, json.dumps({"holder": token, "expires": time.time() + ttl_seconds}).encode()):
        try:
            held = json.loads(store.get_bytes(key))
        except KeyError:
            continue  # released between our attempt and the read
        if held.get("expires", 0) < time.time():
            store.delete(key)
            continue
        if time.monotonic() > deadline:
            raise PromotionConflict(f"another promotion of {model_name} holds the lock: {held.get('holder')}")
        time.sleep(0.5)
    try:
        yield
    finally:
        try:
            if json.loads(store.get_bytes(key)).get("holder") == token:
                store.delete(key)
        except KeyError:
            pass


def download_adapter(model_name: str, version: int) -> Path:
    """Local directory holding the version's adapter files."""
    source = MlflowClient().get_model_version(model_name, str(version)).source
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
