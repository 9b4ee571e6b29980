"""Settings of the API and the worker: one pydantic-settings class read from ``LORP_*``
environment variables (both processes build it from the same environment).

Bad configuration is refused when the settings are built (at process start), never at the first
request: malformed JSON, missing S3 credentials, no API keys, local roots or corpora that do not
exist, a presign TTL out of S3's range.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_CORPUS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _check_bucket(name: str) -> str:
    if not _BUCKET_RE.match(name) or ".." in name:
        raise ValueError(f"not a valid S3 bucket name: {name!r}")
    return name


_HOST_PATTERN_RE = re.compile(
    r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
    r"|^[0-9a-f:.]+$"
)


class Settings(BaseSettings):
    """All service and worker configuration (env prefix ``LORP_``)."""

    model_config = SettingsConfigDict(env_prefix="LORP_", extra="ignore", frozen=True)

    redis_url: str = "redis://localhost:6379/0"
    broker_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr
    s3_secret_access_key: SecretStr
    # Optional read-only credential that signs presigned download URLs (its access key ID is in
    # every URL); without it they are signed with the read-write one above.
    s3_presign_access_key_id: SecretStr | None = None
    s3_presign_secret_access_key: SecretStr | None = None
    s3_bucket: str
    # Where each tenant may read s3:// inputs from: ``s3://<bucket>/<tenant>/`` for the service
    # bucket and every input bucket, plus the tenant's explicit prefixes (see ``input_prefixes``).
    input_buckets: list[str] = Field(default_factory=list)
    tenant_inputs: dict[str, list[str]] = Field(default_factory=dict)
    api_keys: dict[str, str] = Field(repr=False)
    local_roots: list[Path] = Field(default_factory=list)
    corpora: dict[str, Path] = Field(default_factory=dict)
    # Downstream task data (one <task>.jsonl per task, lorp.tasks; e.g. ../shared/data/tasks):
    # jobs with ``tasks`` are scored on it; unset, such jobs are refused at submission.
    tasks_dir: Path | None = None
    allow_hub: bool = False
    trust_remote_code: bool = False
    work_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "lorp-work")
    presign_ttl_seconds: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] = 3600
    max_model_bytes: Annotated[int, Field(gt=0)] | None = None
    # Bytes a job may use on the worker's device: a job with offload "auto" runs sequentially
    # (one block at a time, lorp.offload) when its weights + margin exceed it (or, on CUDA, the
    # device's free memory); unset: only the free memory counts (never sequential on CPU).
    max_device_memory: Annotated[int, Field(gt=0)] | None = None
    # Admission control: the most token positions one job may feed through the model (capture,
    # scoring, fits, evaluation, benchmark; ``JobCreate.estimated_tokens``), per tenant or for all.
    max_job_tokens: Annotated[int, Field(gt=0)] = 50_000_000
    tenant_max_job_tokens: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    visibility_timeout: Annotated[int, Field(ge=60)] = 21600
    # Device-class queues (``jobcore.routing``): a job for CPU workers goes to ``cpu_queue``, one
    # for GPU workers to ``gpu_queue``; each worker consumes its class's (``celery ... -Q gpu``)
    # and advertises the memory it can hold: ``worker_memory_bytes``, else measured (RAM, or the
    # GPU's memory), never above ``max_model_bytes``.
    cpu_queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] = "cpu"
    gpu_queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] = "gpu"
    worker_memory_bytes: Annotated[int, Field(gt=0)] | None = None
    max_request_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    idempotency_ttl_seconds: Annotated[int, Field(ge=60)] = 24 * 3600
    api_workers: Annotated[int, Field(ge=1, le=64)] = 1  # API processes (``service.serve``)
    # HTTP limits of ``service.serve`` (its uvicorn protocol; the body timeout also in the app):
    # request line + headers over this many bytes -> 431; a head not complete this many seconds
    # after the connection opened (or after its first byte, on a kept-alive connection) -> 408;
    # a body not complete this many seconds after its head -> 408. The connection is closed.
    max_header_bytes: Annotated[int, Field(ge=4 * 1024, le=1024 * 1024)] = 32 * 1024
    header_timeout_seconds: Annotated[float, Field(ge=1, le=600)] = 10.0
    body_timeout_seconds: Annotated[float, Field(ge=1, le=3600)] = 30.0
    # Job-state webhooks (jobcore.webhooks): hosts a job's callback_url may name (exact, or
    # "*.example.com"); none: callbacks are off. Private/loopback addresses and plain http only
    # when allowed. Events are signed with the tenant's secret (webhook_secrets, else derived
    # from webhook_secret); a failed POST is retried with doubling waits, up to
    # webhook_max_attempts attempts in all.
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    webhook_allow_private: bool = False
    webhook_allow_http: bool = False
    webhook_secret: SecretStr | None = Field(default=None, repr=False)
    webhook_secrets: dict[str, SecretStr] = Field(default_factory=dict, repr=False)
    webhook_max_attempts: Annotated[int, Field(ge=1, le=50)] = 10
    webhook_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 10.0
    webhook_backoff_seconds: Annotated[float, Field(gt=0, le=3600)] = 2.0
    webhook_backoff_max_seconds: Annotated[float, Field(gt=0, le=86400)] = 600.0
    # Retention: finished jobs (records and artifacts) are deleted this many seconds after they
    # finished by the periodic expiry task (``worker.housekeeper.expire_jobs``, sent by its
    # beat), which runs every ``retention_sweep_seconds``; 0 or unset (empty): kept until
    # DELETEd.
    job_retention_seconds: Annotated[int, Field(ge=0)] | None = 7 * 24 * 3600
    retention_sweep_seconds: Annotated[int, Field(ge=1)] = 3600
    # Quotas per tenant (unset: no limit). Submissions while the tenant has
    # ``tenant_max_queued`` jobs queued get 429; a worker defers (re-queues with a countdown) a
    # job whose tenant already has ``tenant_max_running`` jobs running.
    tenant_max_queued: Annotated[int, Field(ge=1)] | None = None
    tenant_max_running: Annotated[int, Field(ge=1)] | None = None
    # Request rate limit per API key: a token bucket of ``rate_limit_burst`` requests refilled
    # at ``rate_limit_per_second`` (unset: no limit); over it -> 429 with Retry-After.
    rate_limit_per_second: Annotated[float, Field(gt=0)] | None = None
    rate_limit_burst: Annotated[int, Field(ge=1)] = 60

    @field_validator(
        "job_retention_seconds",
        "tenant_max_queued",
        "tenant_max_running",
        "rate_limit_per_second",
        mode="before",
    )
    @classmethod
    def _unset_limit(cls, v: object) -> object:
        return None if v == "" else v  # compose passes an unset variable as ""

    @field_validator("redis_url", "broker_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(_REDIS_SCHEMES):
            raise ValueError(f"must be a redis:// rediss:// or unix:// URL, got {v!r}")
        return v

    @field_validator("s3_endpoint_url", "s3_public_endpoint_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"must be an http(s):// URL, got {v!r}")
        return v

    @field_validator(
        "s3_presign_access_key_id", "s3_presign_secret_access_key", "webhook_secret", mode="before"
    )
    @classmethod
    def _unset_when_empty(cls, v: object) -> object:
        return None if v == "" else v  # compose passes unset optional variables as ""

    @field_validator(
        "s3_access_key_id",
        "s3_secret_access_key",
        "s3_presign_access_key_id",
        "s3_presign_secret_access_key",
    )
    @classmethod
    def _nonempty_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("S3 credentials must not be empty")
        return v

    @field_validator("s3_bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        return _check_bucket(v)

    @field_validator("input_buckets")
    @classmethod
    def _input_buckets(cls, v: list[str]) -> list[str]:
        for bucket in v:
            _check_bucket(bucket)
        return list(dict.fromkeys(v))

    @field_validator("tenant_inputs")
    @classmethod
    def _tenant_inputs(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for tenant, prefixes in v.items():
            for prefix in prefixes:
                bucket, _, key = prefix.removeprefix("s3://").partition("/")
                parts = key.split("/")[:-1]
                if (
                    not prefix.startswith("s3://")
                    or not key.endswith("/")
                    or not parts
                    or any(p in ("", ".", "..") for p in parts)
                ):
                    raise ValueError(
                        f"tenant {tenant!r}: input prefix {prefix!r} must look like "
                        "s3://bucket/some/prefix/ (a key prefix ending in '/')"
                    )
                _check_bucket(bucket)
        return v

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _webhook_hosts(cls, v: list[str]) -> list[str]:
        out = []
        for host in v:
            name = host.lower().rstrip(".")
            if not _HOST_PATTERN_RE.match(name):
                raise ValueError(
                    f"webhook host {host!r}: give a host name, an IP address or *.domain "
                    "(no scheme, port or path)"
                )
            out.append(name)
        return out

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one API key is required ({'<key>': '<tenant>'})")
        for key, tenant in v.items():
            if len(key) < 8:
                raise ValueError("API keys must be at least 8 characters long")
            if not _TENANT_RE.match(tenant):
                raise ValueError(
                    f"tenant {tenant!r}: use 1-63 letters, digits, '_', '.', '-' "
                    "(it becomes an S3 prefix)"
                )
        return v

    @field_validator("local_roots")
    @classmethod
    def _local_roots(cls, v: list[Path]) -> list[Path]:
        roots = []
        for root in v:
            if not root.is_absolute():
                raise ValueError(f"local root {str(root)!r} must be an absolute path")
            if not root.is_dir():
                raise ValueError(f"local root {str(root)!r} is not an existing directory")
            roots.append(Path(os.path.realpath(root)))
        return roots

    @field_validator("corpora")
    @classmethod
    def _corpora(cls, v: dict[str, Path]) -> dict[str, Path]:
        out = {}
        for name, path in v.items():
            if not _CORPUS_RE.match(name):
                raise ValueError(f"corpus name {name!r}: use letters, digits, '_', '.', '-'")
            if not path.is_absolute() or not path.is_file():
                raise ValueError(f"corpus {name!r}: {str(path)!r} is not an existing absolute file")
            out[name] = Path(os.path.realpath(path))
        return out

    @field_validator("tasks_dir", mode="before")
    @classmethod
    def _tasks_dir(cls, v: object) -> Path | None:
        if v is None or v == "":  # compose passes an unset variable as ""
            return None
        v = Path(str(v))
        if not v.is_absolute() or not v.is_dir():
            raise ValueError(f"tasks dir {str(v)!r} is not an existing absolute directory")
        return Path(os.path.realpath(v))

    @field_validator("work_dir")
    @classmethod
    def _work_dir(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"work dir {str(v)!r} must be an absolute path")
        return v

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.broker_url is None:
            object.__setattr__(self, "broker_url", self.redis_url)
        if (self.s3_presign_access_key_id is None) != (self.s3_presign_secret_access_key is None):
            raise ValueError(
                "set both s3_presign_access_key_id and s3_presign_secret_access_key, or neither"
            )
        if self.webhook_allowed_hosts and self.webhook_secret is None:
            missing = sorted(set(self.api_keys.values()) - set(self.webhook_secrets))
            if missing:
                raise ValueError(
                    "webhook_allowed_hosts is set but tenants "
                    f"{missing} have no signing secret: set webhook_secret (or webhook_secrets)"
                )
        if self.cpu_queue == self.gpu_queue:
            raise ValueError(f"cpu_queue and gpu_queue must differ, both are {self.cpu_queue!r}")
        tenants = set(self.api_keys.values())
        for name in ("tenant_inputs", "tenant_max_job_tokens", "webhook_secrets"):
            unknown = sorted(set(getattr(self, name)) - tenants)
            if unknown:
                raise ValueError(f"{name} names tenants without an API key: {unknown}")
        return self

    @property
    def retention(self) -> int | None:
        """Seconds a finished job is kept, or None: kept until deleted."""
        return self.job_retention_seconds or None

    def job_token_limit(self, tenant: str) -> int:
        """The most token positions one job of ``tenant`` may cost."""
        return self.tenant_max_job_tokens.get(tenant, self.max_job_tokens)

    def input_prefixes(self, tenant: str) -> list[str]:
        """The ``s3://`` locations ``tenant`` may read inputs from: its own prefix
        ``s3://<bucket>/<tenant>/`` in the service bucket and in every input bucket, and the
        prefixes the operator granted it in ``tenant_inputs``."""
        buckets = dict.fromkeys([self.s3_bucket, *self.input_buckets])
        return [f"s3://{b}/{tenant}/" for b in buckets] + list(self.tenant_inputs.get(tenant, []))

    def s3_input_granted(self, uri: str, tenant: str) -> bool:
        """True when the (syntax-checked, normalised) ``s3://`` URI lies inside one of
        :meth:`input_prefixes`. A URI naming a prefix itself (``s3://b/acme``) counts as inside
        it. The check is on the key only, never on what exists in the store."""
        target = uri.rstrip("/") + "/"
        return any(target.startswith(p) for p in self.input_prefixes(tenant))
