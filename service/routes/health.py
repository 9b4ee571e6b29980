"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import StorageDep, StoreDep
from service.schemas import HealthResponse

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="Process is up")
async def health() -> HealthResponse:
    """Always ok while the process serves requests (no I/O: answered on the event loop)."""
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=HealthResponse,
    summary="Redis and the object store answer",
    responses={503: {"model": HealthResponse, "description": "a dependency is unreachable"}},
)
def ready(store: StoreDep, storage: StorageDep, response: Response) -> HealthResponse:
    """Ready when both the job store (Redis) and the artifact bucket answer."""
    checks: dict[str, bool] = {}
    for name, probe in (("redis", store.ping), ("s3", storage.ping)):
        try:
            checks[name] = bool(probe())
        except Exception as e:  # any failure means "not ready", never a 500
            log.warning("readiness check %s failed: %s", name, e)
            checks[name] = False
    if not all(checks.values()):
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = "5"
        return HealthResponse(status="unavailable", checks=checks)
    return HealthResponse(status="ok", checks=checks)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "lorp_http_requests_total 1"}}}},
)
def metrics(request: Request) -> Response:
    """Request counts/latencies, job submissions and queue depth in Prometheus text format."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
