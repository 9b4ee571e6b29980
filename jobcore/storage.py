"""Object storage (S3 API: AWS S3, MinIO, SeaweedFS) through boto3.

Every failure is translated: unreachable endpoint / throttling / 5xx after boto's own retries ->
:class:`StorageUnavailableError`; missing object -> :class:`StorageNotFoundError`; anything else
-> :class:`StorageError`. Large files upload in parts (``TransferConfig``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from jobcore.config import Settings
from jobcore.errors import StorageError, StorageNotFoundError, StorageUnavailableError

T = TypeVar("T")
MiB = 1024 * 1024
#: A job's commit point: written after every artifact, deleted before any (jobcore.retention).
MANIFEST = "manifest.json"
_UNAVAILABLE_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "503",
    "500",
    "502",
    "504",
    "Throttling",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NoSuchBucket", "NotFound"}


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object."""

    key: str
    size: int


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _NOT_FOUND_CODES or status == "404":
            raise StorageNotFoundError(f"{what}: not found") from e
        if code in _UNAVAILABLE_CODES or status.startswith("5"):
            raise StorageUnavailableError(f"{what}: object store unavailable ({code})") from e
        raise StorageError(f"{what}: object store refused ({code})") from e
    except (
        EndpointConnectionError,
        ConnectTimeoutError,
        ReadTimeoutError,
        ConnectionClosedError,
    ) as e:
        raise StorageUnavailableError(f"{what}: object store unreachable") from e
    except S3UploadFailedError as e:
        raise StorageUnavailableError(f"{what}: upload failed") from e
    except BotoCoreError as e:
        raise StorageUnavailableError(f"{what}: object store error ({type(e).__name__})") from e


class Storage:
    """The service's object-store client (one bucket for artifacts, any bucket for inputs)."""

    def __init__(
        self,
        settings: Settings,
        *,
        max_attempts: int = 4,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
    ) -> None:
        self.bucket = settings.s3_bucket
        self.presign_ttl = settings.presign_ttl_seconds
        common: dict[str, Any] = {
            "region_name": settings.s3_region,
            "aws_access_key_id": settings.s3_access_key_id.get_secret_value(),
            "aws_secret_access_key": settings.s3_secret_access_key.get_secret_value(),
        }
        cfg = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=2,
            read_timeout=30,
            # checksums only when required: S3-compatible servers differ in CRC support
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, config=cfg, **common
        )
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        signer = dict(common)
        if settings.s3_presign_access_key_id and settings.s3_presign_secret_access_key:
            # a read-only identity signs what leaves the service (its key ID is in every URL)
            signer["aws_access_key_id"] = settings.s3_presign_access_key_id.get_secret_value()
            signer["aws_secret_access_key"] = (
                settings.s3_presign_secret_access_key.get_secret_value()
            )
        self._presigner = (
            self.client
            if public == settings.s3_endpoint_url and signer == common
            else boto3.client("s3", endpoint_url=public, config=cfg, **signer)
        )
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=4,
        )

    # -- buckets ------------------------------------------------------------------------

    def ensure_bucket(self, bucket: str | None = None) -> None:
        """Create the bucket when missing."""
        bucket = bucket or self.bucket
        with _translated(f"bucket {bucket}"):
            try:
                self.client.head_bucket(Bucket=bucket)
                return
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status != 404:
                    raise
            try:
                self.client.create_bucket(Bucket=bucket)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in (
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                ):
                    raise

    def ping(self) -> bool:
        """True when the artifact bucket answers."""
        with _translated("ping"):
            self.client.head_bucket(Bucket=self.bucket)
        return True

    # -- objects ------------------------------------------------------------------------

    def upload_file(
        self,
        path: Path,
        key: str,
        bucket: str | None = None,
        callback: Callable[[int], None] | None = None,
    ) -> None:
        """Upload a file (multipart above the threshold)."""
        with _translated(f"upload {key}"):
            self.client.upload_file(
                str(path), bucket or self.bucket, key, Config=self.transfer, Callback=callback
            )

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> None:
        """Write a small object."""
        with _translated(f"put {key}"):
            self.client.put_object(
                Bucket=bucket or self.bucket, Key=key, Body=data, ContentType=content_type
            )

    def get_bytes(self, key: str, bucket: str | None = None, max_bytes: int = 64 * MiB) -> bytes:
        """Read a small object."""
        with _translated(f"get {key}"):
            obj = self.client.get_object(Bucket=bucket or self.bucket, Key=key)
            if int(obj.get("ContentLength", 0)) > max_bytes:
                raise StorageError(f"get {key}: larger than {max_bytes} bytes")
            return bytes(obj["Body"].read())

    def get_json(self, key: str, bucket: str | None = None) -> Any:
        """Read a JSON object."""
        return json.loads(self.get_bytes(key, bucket))

    def head(self, key: str, bucket: str | None = None) -> ObjectInfo:
        """Size of one object (:class:`StorageNotFoundError` when missing)."""
        with _translated(f"head {key}"):
            h = self.client.head_object(Bucket=bucket or self.bucket, Key=key)
        return ObjectInfo(key, int(h["ContentLength"]))

    def list_prefix(self, prefix: str, bucket: str | None = None) -> list[ObjectInfo]:
        """Every object under ``prefix`` (use a trailing ``/`` for a directory)."""
        out: list[ObjectInfo] = []
        with _translated(f"list {prefix}"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket or self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"], int(obj["Size"])))
        return out

    def delete(self, key: str, bucket: str | None = None) -> None:
        """Delete one object (no error when it does not exist)."""
        with _translated(f"delete {key}"):
            self.client.delete_object(Bucket=bucket or self.bucket, Key=key)

    def delete_prefix(self, prefix: str, bucket: str | None = None) -> int:
        """Delete every object under ``prefix``; returns how many were deleted."""
        if not prefix.endswith("/"):
            raise ValueError("delete_prefix needs a prefix ending in '/'")
        objects = self.list_prefix(prefix, bucket)
        with _translated(f"delete {prefix}"):
            for i in range(0, len(objects), 1000):
                chunk = objects[i : i + 1000]
                self.client.delete_objects(
                    Bucket=bucket or self.bucket,
                    Delete={"Objects": [{"Key": o.key} for o in chunk], "Quiet": True},
                )
        return len(objects)

    def download_file(self, key: str, dest: Path, bucket: str | None = None) -> Path:
        """Download one object to ``dest``."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _translated(f"download {key}"):
            self.client.download_file(bucket or self.bucket, key, str(dest), Config=self.transfer)
        return dest

    def download_prefix(
        self,
        prefix: str,
        dest: Path,
        bucket: str | None = None,
        include: Callable[[str], bool] | None = None,
    ) -> list[Path]:
        """Download every object under ``prefix/`` into ``dest``, keeping relative paths.

        Keys that would land outside ``dest`` (``..``, absolute) are refused.
        """
        prefix = prefix.rstrip("/") + "/"
        root = Path(os.path.realpath(dest))
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        for obj in self.list_prefix(prefix, bucket):
            rel = obj.key[len(prefix) :]
            if not rel or rel.endswith("/"):
                continue
            if include is not None and not include(rel):
                continue
            paths.append(self.download_file(obj.key, safe_target(root, rel), bucket))
        return paths

    def presign_get(self, key: str, ttl: int | None = None, bucket: str | None = None) -> str:
        """A presigned GET URL for one object."""
        with _translated(f"presign {key}"):
            return str(
                self._presigner.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": bucket or self.bucket, "Key": key},
                    ExpiresIn=ttl or self.presign_ttl,
                )
            )


def safe_target(root: Path, rel: str) -> Path:
    """``root / rel`` for an object key relative to a prefix; :class:`StorageError` when the key
    would land outside ``root`` (``..``, absolute keys, symlinks inside ``root``)."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"refusing object key outside the prefix: {rel!r}")
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(real_root / rel))
    if not target.is_relative_to(real_root) or target == real_root:
        raise StorageError(f"refusing object key outside the prefix: {rel!r}")
    return target


def job_prefix(tenant: str, job_id: str) -> str:
    """Where a job's artifacts live: ``<tenant>/jobs/<job_id>/``."""
    return f"{tenant}/jobs/{job_id}/"


def retry_storage(
    fn: Callable[[], T],
    *,
    attempts: int = 3,
    base_delay: float = 1.0,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call ``fn`` again (exponential backoff) while it raises :class:`StorageUnavailableError`."""
    import time

    sleeper = sleep or time.sleep
    for i in range(attempts):
        try:
            return fn()
        except StorageUnavailableError:
            if i == attempts - 1:
                raise
            sleeper(base_delay * 2**i)
    raise AssertionError("unreachable")
