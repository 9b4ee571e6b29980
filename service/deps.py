"""FastAPI dependencies as ``Annotated`` aliases, so routes read like prose.

They are ``async def`` although they (almost) never await: FastAPI runs a plain ``def``
dependency in the thread pool, one hop per dependency and request, while these only read the app
state; :func:`get_tenant` goes to the thread pool for Redis only when a rate limit is set."""

from __future__ import annotations

import hmac
import math
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from jobcore.config import Settings
from jobcore.errors import RateLimitedError
from jobcore.storage import Storage
from jobcore.store import JobStore
from service.queue import JobQueue


async def get_settings(request: Request) -> Settings:
    """The app's settings (built once at startup)."""
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    """The app's job store."""
    return request.app.state.store


async def get_storage(request: Request) -> Storage:
    """The app's object-store client."""
    return request.app.state.storage


async def get_queue(request: Request) -> JobQueue:
    """Where new jobs' run messages go."""
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKeyAuth",
    description="The API key the operator issued (it maps to a tenant).",
    auto_error=False,  # get_tenant answers a missing key itself, like an unknown one
)
"""The ``X-API-Key`` security scheme: OpenAPI declares it (Swagger UI's Authorize button,
generated clients' ``AuthenticatedClient``) on every route that needs a key."""


async def get_tenant(
    settings: SettingsDep,
    store: StoreDep,
    x_api_key: Annotated[str | None, Security(API_KEY_HEADER)] = None,
) -> str:
    """The tenant of the caller's ``X-API-Key``; 401 when missing or unknown; 429 when the key
    is over its request rate (``rate_limit_per_second``, token bucket in Redis)."""
    tenant = None
    if x_api_key:
        given = x_api_key.encode("utf-8", "surrogateescape")
        for key, owner in settings.api_keys.items():
            if hmac.compare_digest(given, key.encode()):
                tenant = owner
    if tenant is None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or unknown API key (send X-API-Key)",
            headers={"WWW-Authenticate": "ApiKey"},
        )
    rate = settings.rate_limit_per_second
    if rate is not None and x_api_key:
        burst = settings.rate_limit_burst
        wait = await run_in_threadpool(store.take_token, x_api_key, rate, burst)
        if wait > 0:
            raise RateLimitedError(
                f"more than {burst} requests in a burst or {rate:g} per second for this API key "
                f"(rate_limit_burst={burst}, rate_limit_per_second={rate:g}); retry later",
                retry_after=max(1, math.ceil(wait)),
            )
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
