"""The FastAPI application: ``uvicorn service.main:app``.

Settings are read once when the app starts (a bad configuration stops the start-up). Errors are
mapped at this edge: job store or queue down -> 503 with ``Retry-After``; object store down ->
503; unknown jobs -> 404; conflicts -> 409; a tenant's queued-jobs quota or an API key's request
rate -> 429 with ``Retry-After``; bodies over ``LORP_MAX_REQUEST_BYTES`` -> 413;
bodies not complete ``LORP_BODY_TIMEOUT_SECONDS`` after reading began -> 408; anything
unexpected -> a 500 with a generic message (tracebacks go to the log only). The access log never
shows credentials passed in a query string (``service.serve.RedactQueryFilter``).

Run it with ``python -m service.serve`` (``LORP_API_WORKERS`` processes). With more than one,
``PROMETHEUS_MULTIPROC_DIR`` is set and ``/metrics`` sums the request metrics of all processes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import ExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobcore.config import Settings
from jobcore.errors import (
    IdempotencyConflictError,
    InvalidTransitionError,
    JobNotFoundError,
    QueueUnavailableError,
    QuotaExceededError,
    ServiceError,
    StorageError,
    StorageNotFoundError,
    StorageUnavailableError,
)
from jobcore.metrics import read_job_metrics
from jobcore.routing import DEVICE_CLASSES
from jobcore.storage import Storage
from jobcore.store import JobStore
from service.queue import JobQueue
from service.routes import health, jobs
from service.serve import install_log_redaction

log = logging.getLogger("service")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER_SECONDS = "5"
WARM_CONNECTIONS = 10  # job store (and broker) connections opened at start


def _error(
    status_code: int, detail: str, code: str, retry: bool = False, retry_after: str | None = None
) -> JSONResponse:
    headers = {"Retry-After": retry_after or RETRY_AFTER_SECONDS} if retry else None
    return JSONResponse({"detail": detail, "code": code}, status_code=status_code, headers=headers)


async def _send_error(send: Send, status_code: int, detail: str, code: str) -> None:
    import json

    body = json.dumps({"detail": detail, "code": code}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 (by Content-Length or while reading),
    and bodies not complete ``timeout`` seconds after reading began with 408 (slow clients must
    not hold an API process's connections; ``None``: no limit)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await _send_error(send, 400, "malformed Content-Length", "bad_request")
                return
            if too_big:
                await _send_error(
                    send, 413, f"body larger than {self.max_bytes} bytes", "payload_too_large"
                )
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        try:
            async with asyncio.timeout(self.timeout):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        break
                    chunks.append(chunk)
                    more = bool(message.get("more_body", False))
        except TimeoutError:
            detail = f"request body not received within {self.timeout:g} s"
            await _send_error(send, 408, detail, "request_timeout")
            return
        if size > self.max_bytes:
            await _send_error(
                send, 413, f"body larger than {self.max_bytes} bytes", "payload_too_large"
            )
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class MetricsMiddleware:
    """Count requests and time them per route template (``registry`` None: multiprocess mode,
    the values go to ``PROMETHEUS_MULTIPROC_DIR`` and :class:`MultiProcessCollector` reads them)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry | None) -> None:
        self.app = app
        self.requests = Counter(
            "lorp_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "lorp_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        async def wrapped_send(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, wrapped_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.requests.labels(scope["method"], route, str(status_code)).inc()
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - start)


class _QueueCollector:
    """Queue depth per broker queue and the workers' heartbeats (their pool advertisements,
    ``jobcore.routing``), read at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Any:
        g = GaugeMetricFamily(
            "lorp_queue_length", "messages waiting in each broker queue", labels=["queue"]
        )
        try:
            queue: JobQueue = self.app.state.queue
            for name, n in queue.lengths().items():
                g.add_metric([name], float(n))
            workers = queue.store.pool_workers(list(DEVICE_CLASSES))
        except Exception:  # no value is better than a failed scrape
            return
        yield g
        age = GaugeMetricFamily(
            "lorp_worker_heartbeat_age_seconds",
            "seconds since each worker last refreshed its advertisement (its heartbeat)",
            labels=["worker", "device_class"],
        )
        memory = GaugeMetricFamily(
            "lorp_worker_memory_bytes",
            "memory each worker advertised it can hold a model in",
            labels=["worker", "device_class"],
        )
        live = GaugeMetricFamily(
            "lorp_workers_live", "workers whose heartbeat is current", labels=["device_class"]
        )
        counts = dict.fromkeys(DEVICE_CLASSES, 0)
        for w in workers:
            age.add_metric([w["worker"], w["device_class"]], w["age_s"])
            memory.add_metric([w["worker"], w["device_class"]], float(w["memory"]))
            counts[w["device_class"]] += int(w["live"])
        for device_class, n in counts.items():
            live.add_metric([device_class], float(n))
        yield from (age, memory, live)


class _JobMetricsCollector:
    """Per-stage job durations and finished jobs by state, recorded by the workers in Redis
    (:mod:`jobcore.metrics`), read at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Any:
        try:
            store: JobStore = self.app.state.store
            stages, jobs = read_job_metrics(store.redis)
        except Exception:  # no value is better than a failed scrape
            return
        hist = HistogramMetricFamily(
            "lorp_job_stage_duration_seconds",
            "seconds each stage of a job took (download, the pipeline's stages, upload)",
            labels=["stage"],
        )
        for stage, h in sorted(stages.items()):
            buckets = [("+Inf" if math.isinf(le) else str(le), n) for le, n in h.buckets]
            hist.add_metric([stage], buckets, h.total)
        yield hist
        done = CounterMetricFamily(
            "lorp_jobs_finished", "jobs that ended, by final state", labels=["state"]
        )
        for state, n in sorted(jobs.items()):
            done.add_metric([state], n)
        yield done


def _safe(value: Any) -> Any:
    """JSON-safe echo of user input: lone surrogates escaped, long values cut."""
    if isinstance(value, str):
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value if len(value) <= 200 else value[:200] + "..."
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN/inf are not JSON: echo them as text, never a 500
    if isinstance(value, bool | int | float) or value is None:
        return value
    return None  # containers are not echoed back


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return JSONResponse(
            {"detail": str(exc.detail), "code": code},
            status_code=exc.status_code,
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            out = {
                "type": str(err.get("type", "value_error")),
                "loc": [_safe(p) for p in err.get("loc", ())],
                "msg": _safe(str(err.get("msg", "invalid value"))),
            }
            if "input" in err:
                out["input"] = _safe(err["input"])
            errors.append(out)
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(JobNotFoundError)
    async def _not_found(_: Request, exc: JobNotFoundError) -> JSONResponse:
        return _error(404, str(exc), exc.code)

    @app.exception_handler(IdempotencyConflictError)
    async def _idem(_: Request, exc: IdempotencyConflictError) -> JSONResponse:
        return _error(409, str(exc), exc.code)

    @app.exception_handler(InvalidTransitionError)
    async def _conflict(_: Request, exc: InvalidTransitionError) -> JSONResponse:
        return _error(409, str(exc), exc.code)

    @app.exception_handler(QuotaExceededError)
    async def _quota(_: Request, exc: QuotaExceededError) -> JSONResponse:
        return _error(429, str(exc), exc.code, retry=True, retry_after=str(exc.retry_after))

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        if isinstance(exc, StorageNotFoundError):
            return _error(404, "artifact not found", "artifact_not_found")
        if isinstance(exc, StorageUnavailableError):
            return _error(503, "object store unavailable", exc.code, retry=True)
        log.error("storage error: %s", exc)
        return _error(502, "object store error", exc.code)

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(400, str(exc), exc.code)

    @app.exception_handler(RedisError)
    async def _redis(_: Request, exc: RedisError) -> JSONResponse:
        log.warning("job store unavailable: %s", exc)
        return _error(503, "job store unavailable", "store_unavailable", retry=True)

    @app.exception_handler(QueueUnavailableError)
    async def _queue(_: Request, exc: QueueUnavailableError) -> JSONResponse:
        log.warning("queue unavailable: %s", exc)
        return _error(503, "job queue unavailable", "queue_unavailable", retry=True)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error(500, "internal error", "internal")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. ``settings`` default to the environment, read when the app starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cfg = settings or Settings()  # type: ignore[call-arg]  # from LORP_* env
        app.state.settings = cfg
        app.state.store = JobStore.from_settings(cfg)
        app.state.storage = Storage(cfg)
        app.state.queue = JobQueue(cfg, app.state.store)
        try:
            app.state.storage.ensure_bucket()
        except StorageError as e:  # /readyz reports it; the API still serves health/auth
            log.warning("could not ensure bucket %s: %s", cfg.s3_bucket, e)
        await _warm_up(app)
        # The imports (torch, via lorp) leave ~230k objects that live as long as the process;
        # frozen, full collections no longer scan them (one took 0.18 s, stalling every request).
        gc.freeze()
        try:
            yield
        finally:
            app.state.queue.close()
            app.state.store.close()

    app = FastAPI(
        title="LoRP pruning service",
        version="0.1.0",
        description=(
            "Training-free depth pruning (LoRP) of LLMs as jobs: submit a model, a calibration "
            "text and a budget; poll the job; download the pruned checkpoint and the report. "
            "Authenticate with an `X-API-Key` header."
        ),
        lifespan=lifespan,
        # operation ids are the route functions' names (create_job, get_job, ...): what a
        # client generated from /openapi.json calls its methods
        generate_unique_id_function=_operation_id,
    )
    app.state.registry = registry = CollectorRegistry()
    registry.register(_QueueCollector(app))
    registry.register(_JobMetricsCollector(app))
    multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    if multiprocess:
        MultiProcessCollector(registry)
    app.include_router(health.router)
    app.include_router(jobs.router)
    _install_error_handlers(app)
    max_bytes = settings.max_request_bytes if settings else _env_max_bytes()
    timeout = settings.body_timeout_seconds if settings else _env_body_timeout()
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes, timeout=timeout)
    install_log_redaction()  # also under a plain uvicorn (service.serve configures it itself)
    app.add_middleware(MetricsMiddleware, registry=None if multiprocess else registry)
    return app


def _operation_id(route: APIRoute) -> str:
    """A route's OpenAPI ``operationId``: its name (the function's, unless the route sets one)."""
    return route.name


async def _warm_up(app: FastAPI) -> None:
    """Do at start what a fresh process otherwise does in its first requests, where every
    request of a burst arriving meanwhile waits for it (0.1-0.3 s measured): FastAPI builds its
    per-route state at the first route lookup, AnyIO starts its thread pool, and the first
    concurrent submissions open job store (and broker) connections and run Celery's one-time
    set-up of its task messages."""
    app.url_path_for("get_job", job_id="0")
    await run_in_threadpool(_connect, app)


def _connect(app: FastAPI) -> None:
    """Open :data:`WARM_CONNECTIONS` job store (and separate broker) connections and build one
    task message. Best effort: a dependency that is down is reported by /readyz and answered
    with 503 per request."""
    store: JobStore = app.state.store
    queue: JobQueue = app.state.queue
    pools = [r.connection_pool for r in (store.redis, queue.broker) if r is not None]
    try:
        queue.message("0" * 32, queue.queues[0])
        with ExitStack() as stack:
            for pool in pools:
                for _ in range(WARM_CONNECTIONS):
                    connection = pool.get_connection()
                    stack.callback(pool.release, connection)
    except Exception as e:
        log.warning("could not reach the job store or broker at start: %s", e)


def _env_max_bytes() -> int:
    """``LORP_MAX_REQUEST_BYTES`` without building (and validating) all settings at import."""
    default = Settings.model_fields["max_request_bytes"].default
    try:
        return int(os.environ.get("LORP_MAX_REQUEST_BYTES", default))
    except ValueError:
        return int(default)


def _env_body_timeout() -> float:
    """``LORP_BODY_TIMEOUT_SECONDS``, read like :func:`_env_max_bytes`."""
    default = Settings.model_fields["body_timeout_seconds"].default
    try:
        return float(os.environ.get("LORP_BODY_TIMEOUT_SECONDS", default))
    except ValueError:
        return float(default)


app = create_app()
