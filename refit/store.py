"""The object store: S3 through boto3, or a local directory with the same layout.

Keys are ``/``-separated paths such as
``inference/model=intent-classifier/date=2026-11-26/part-000001.parquet``.
Both backends implement the same small interface and pass the same contract
tests, so every stage is written once against ``ObjectStore``.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from refit.errors import RefitError

if TYPE_CHECKING:
    import pandas as pd

    from refit.settings import Settings


class ObjectStore(ABC):
    """Bytes under keys. Writes are atomic: a reader sees all of an object or none."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key``; returns the object's URI."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read the object at ``key``; ``KeyError`` if there is none."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix``, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """A URI a person or another tool can open: ``s3://...`` or ``file://...``."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if no object is there; False if one was (atomic: locks rest on it)."""

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object at ``key`` and a tag naming this version of it (S3's ETag); ``KeyError`` if absent.

        Two reads return the same tag only if nobody wrote the key in between
        (for objects whose bytes differ at every write, as locks' do).
        """

    @abstractmethod
    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        """Overwrite ``key`` only if it is still the version ``tag``; False if it changed or is gone (atomic)."""

    @abstractmethod
    def delete_if(self, key: str, tag: str) -> bool:
        """Delete ``key`` only if it is still the version ``tag``; False if it changed or is gone (atomic)."""

    def exists(self, key: str) -> bool:
        return key in self.list(key)

    def put_parquet(self, key: str, frame: pd.DataFrame) -> str:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return self.put_bytes(key, buffer.getvalue())

    def get_parquet(self, key: str) -> pd.DataFrame:
        import pandas as pd

        return pd.read_parquet(io.BytesIO(self.get_bytes(key)))

    def read_parquet_prefix(self, prefix: str) -> pd.DataFrame:
        """Concatenate every Parquet part under ``prefix`` (empty frame if none)."""
        import pandas as pd

        parts = [self.get_parquet(k) for k in self.list(prefix) if k.endswith(".parquet")]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# The file a local directory's conditional writes lock (``flock``); never listed as an object.
CAS_GUARD = ".cas-guard"


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LocalStore(ObjectStore):
    """A directory laid out exactly like the bucket. The embedded default."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    @contextmanager
    def _exclusive(self, path: Path) -> Iterator[None]:
        """Hold an exclusive ``flock`` on the directory's guard file: conditional writes and deletes in
        that directory take it, so a compare and the write that follows it are one step for every process
        on this machine (a local store is one machine's, or one NFS mount with working locks)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent / CAS_GUARD, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _staged(self, path: Path, data: bytes) -> Path:
        """``data`` written whole to a hidden file beside ``path`` (``list`` skips ``.tmp-`` names)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def put_bytes(self, key: str, data: bytes) -> str:
        path = self._path(key)
        staged = self._staged(path, data)
        try:
            os.replace(staged, path)  # readers see the old object or the new one, never half of one
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return path.as_uri()

    def get_bytes(self, key: str) -> bytes:
        try:  # one read, no check first: the object may be deleted in between (a released lock)
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(key) from None

    def list(self, prefix: str = "") -> list[str]:
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"invalid prefix {prefix!r}")
        if not self.root.is_dir():
            return []
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = (
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-") and p.name != CAS_GUARD
        )
        return sorted(k for k in keys if k.startswith(prefix))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def create(self, key: str, data: bytes) -> bool:
        """Staged whole, then hard-linked into place, which fails if the key exists: no reader ever sees the
        object created but still empty (as between an ``O_EXCL`` open and its write)."""
        path = self._path(key)
        staged = self._staged(path, data)
        try:
            os.link(staged, path)
        except FileExistsError:
            return False
        finally:
            staged.unlink()
        return True

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        path = self._path(key)
        staged = self._staged(path, data)
        try:
            with self._exclusive(path):
                try:
                    current = hashlib.sha256(path.read_bytes()).hexdigest()
                except (FileNotFoundError, IsADirectoryError):
                    return False
                if current != tag:
                    return False
                os.replace(staged, path)
                return True
        finally:
            staged.unlink(missing_ok=True)

    def delete_if(self, key: str, tag: str) -> bool:
        path = self._path(key)
        with self._exclusive(path):
            try:
                current = hashlib.sha256(path.read_bytes()).hexdigest()
            except (FileNotFoundError, IsADirectoryError):
                return False
            if current != tag:
                return False
            path.unlink()
            return True

    def uri(self, key: str = "") -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri()


class S3Store(ObjectStore):
    """An S3 bucket through boto3: AWS, MinIO or any endpoint that speaks S3."""

    def __init__(self, bucket: str, prefix: str = "", client=None, *, endpoint_url: str | None = None, region: str = "us-east-1"):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        # An endpoint that is down is known in seconds, not minutes (botocore waits 60 s per connect by
        # default): the request log spills to disk and the lock's waiters retry instead of hanging.
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (a fresh MinIO or test endpoint)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def put_bytes(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise KeyError(key) from exc
            raise

    def list(self, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def create(self, key: str, data: bytes) -> bool:
        """S3 conditional write (``If-None-Match: *``): AWS, MinIO and moto refuse it with 412 if the key exists."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise
        return True

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise KeyError(key) from exc
            raise
        return answer["Body"].read(), answer["ETag"]

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        """S3 conditional write (``If-Match: <ETag>``): refused with 412 if the object changed, 404 if gone."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=tag)
        except ClientError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    def delete_if(self, key: str, tag: str) -> bool:
        """S3 conditional delete (``If-Match: <ETag>`` on DeleteObject; AWS since 2025-09, moto, Ceph).

        An endpoint that ignores the header deletes unconditionally: run the
        store on one that honours it (README, threat model) where promotions
        may race.
        """
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=tag)
        except ClientError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"


def update_object(store: ObjectStore, key: str, change: Callable[[bytes | None], bytes], attempts: int = 50) -> bytes:
    """Read-modify-write of one object that loses no concurrent writer's change (compare-and-swap, retried).

    ``change`` gets the object's bytes (None when absent) and returns the new
    bytes; it may be called more than once, so it must not have side effects.
    Raises ``RefitError`` when ``attempts`` writers in a row got there first.
    """
    for _ in range(attempts):
        try:
            data, tag = store.get_versioned(key)
        except KeyError:
            new = change(None)
            if store.create(key, new):
                return new
            continue
        new = change(data)
        if store.replace_if(key, new, tag):
            return new
    raise RefitError(f"{store.uri(key)} changed under every one of {attempts} attempts to update it")


def _precondition_failed(exc) -> bool:
    """A conditional request refused: the object changed (412) or is gone (404 under ``If-Match``)."""
    return exc.response["Error"]["Code"] in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409",
                                             "NoSuchKey", "404")


def open_store(settings: Settings) -> ObjectStore:
    """The store the settings name; S3 is checked to answer before any work starts."""
    if settings.store == "local":
        return LocalStore(settings.local_store_root)
    from botocore.exceptions import BotoCoreError, ClientError

    store = S3Store(
        settings.s3_bucket, settings.s3_prefix, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
    try:
        store.ensure_bucket()
    except (BotoCoreError, ClientError) as exc:
        where = settings.s3_endpoint_url or "AWS"
        raise RefitError(f"S3 store s3://{settings.s3_bucket} at {where} is not reachable: {exc}") from exc
    return store
