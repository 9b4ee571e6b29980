"""Service settings: one pydantic-settings class read from ``LORP_*`` environment variables.

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
    s3_bucket: str
    api_keys: dict[str, str] = Field(repr=False)
    local_roots: list[Path] = Field(default_factory=list)
    corpora: dict[str, Path] = Field(default_factory=dict)
    allow_hub: bool = False
    trust_remote_code: bool = False
    work_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "lorp-work")
    presign_ttl_seconds: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] = 3600
    max_model_bytes: Annotated[int, Field(gt=0)] | None = None
    visibility_timeout: Annotated[int, Field(ge=60)] = 21600
    max_request_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    idempotency_ttl_seconds: Annotated[int, Field(ge=60)] = 24 * 3600
    api_workers: Annotated[int, Field(ge=1, le=64)] = 1  # API processes (``service.serve``)

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

    @field_validator("s3_access_key_id", "s3_secret_access_key")
    @classmethod
    def _nonempty_secret(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().strip():
            raise ValueError("S3 credentials must not be empty")
        return v

    @field_validator("s3_bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        if not _BUCKET_RE.match(v) or ".." in v:
            raise ValueError(f"not a valid S3 bucket name: {v!r}")
        return v

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
        return self
