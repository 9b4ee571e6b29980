"""``/jobs``: submit, read, list, cancel and delete jobs; read a job's report and artifacts."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from jobcore.config import Settings
from jobcore.errors import INTERNAL, InvalidTransitionError
from jobcore.retention import delete_job as delete_job_everywhere
from jobcore.routing import DEVICE_CLASSES, choose_queue, job_weight_bytes
from jobcore.spec import JobCreate, JobError, JobState, validate_job
from jobcore.storage import Storage, job_prefix
from jobcore.store import JobStore
from lorp.errors import ModelTooLargeError
from service.deps import QueueDep, SettingsDep, StorageDep, StoreDep, TenantDep
from service.schemas import ArtifactPublic, ArtifactsPublic, ErrorResponse, JobPublic, JobsPublic

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

_ERR = {"model": ErrorResponse}
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}
_RATE_LIMITED = "the API key's request rate limit (rate_limited)"
_COMMON: dict[int | str, dict[str, Any]] = {
    401: {**_ERR, "description": "missing or unknown API key"},
    429: {**_ERR, "description": _RATE_LIMITED, "headers": _RETRY_AFTER},
    503: {**_ERR, "description": "job store, queue or object store unavailable; retry later"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {**_ERR, "description": "no such job for this tenant"},
}

_CREATE_EXAMPLES = {
    "s3-safetensors": {
        "summary": "safetensors model in S3, named corpus, remove 6 blocks",
        "value": {
            "model": "s3://lorp-inputs/acme/models/smollm2-135m",
            "calibration": "corpus:wikitext2-train",
            "method": "lorp",
            "budget": {"blocks": 6},
        },
    },
    "gguf-fraction-benchmark": {
        "summary": "GGUF under a local root, 20% of blocks, held-out text and a benchmark",
        "value": {
            "model": "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            "calibration": "s3://lorp-inputs/acme/texts/calib.txt",
            "evaluation": "s3://lorp-inputs/acme/texts/heldout.txt",
            "method": "shortgpt",
            "budget": {"fraction": 0.2},
            "windows": 16,
            "seq_len": 256,
            "benchmark": {"prefill": [[1, 512]], "decode": [[1, 32, 64]], "repetitions": 10},
        },
    },
    "auto-quality-gate": {
        "summary": "method auto picks the best candidate; refuse the job if quality drops too much",
        "value": {
            "model": "s3://lorp-inputs/acme/models/smollm2-135m",
            "calibration": "corpus:wikitext2-train",
            "method": "auto",
            "budget": {"blocks": 6},
            "quality_gate": {"max_ppl_ratio": 1.5, "min_top1_agreement": 0.8},
        },
    },
}


def _json(
    model: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``model`` as the JSON response. The route's ``response_model`` still documents it, but a
    returned ``Response`` skips FastAPI validating the model again, which for a sync route is a
    second hop to the thread pool per request."""
    return Response(
        model.model_dump_json(),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


def _route(spec: JobCreate, settings: Settings, store: JobStore, storage: Storage) -> str:
    """The queue of the worker pool that runs ``spec`` (:mod:`jobcore.routing`); a model no
    pool can hold is a 422 on ``model`` with code ``model_too_large``. The model's size is
    looked up only when some pool advertised its memory (else nothing could refuse it)."""
    pools = store.pool_memory(tuple(DEVICE_CLASSES))
    size = job_weight_bytes(spec, storage) if pools else None
    try:
        return choose_queue(spec.device, size, pools, settings)
    except ModelTooLargeError as e:
        error = {"type": e.code, "loc": ("body", "model"), "msg": str(e), "input": spec.model}
        raise RequestValidationError([error]) from None


def _full_validation(body: JobCreate, settings: SettingsDep, tenant: str) -> JobCreate:
    try:
        return validate_job(body.model_dump(), settings, tenant)
    except ValidationError as e:
        errors = [
            {**err, "loc": ("body", *err["loc"])}
            for err in e.errors(include_url=False, include_context=False)
        ]
        raise RequestValidationError(errors) from None


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    summary="Submit a pruning job",
    responses={
        **_COMMON,
        400: {**_ERR, "description": "body that can't be parsed (e.g. not UTF-8)"},
        409: {**_ERR, "description": "Idempotency-Key reused with a different body"},
        413: {**_ERR, "description": "request body too large"},
        429: {
            **_ERR,
            "description": "the tenant's quota of queued jobs (quota_exceeded; nothing is "
            f"stored) or {_RATE_LIMITED}",
            "headers": _RETRY_AFTER,
        },
    },
)
def create_job(
    body: Annotated[JobCreate, Body(openapi_examples=_CREATE_EXAMPLES)],
    tenant: TenantDep,
    settings: SettingsDep,
    store: StoreDep,
    storage: StorageDep,
    queue: QueueDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            pattern=r"^[\x21-\x7e]+$",
            description="retries with the same key and body return the same job",
        ),
    ] = None,
) -> Response:
    """Validate the spec, store a queued job and enqueue it on its worker pool's queue (its
    ``device`` and its model's size choose it; a model no pool can hold is a 422 whose error
    on ``model`` has type ``model_too_large`` and the sizes). A repeat with the same
    ``Idempotency-Key`` and body returns the first job; another body is a 409. While the tenant
    has ``tenant_max_queued`` jobs queued a new one is refused with 429 and not stored."""
    spec = _full_validation(body, settings, tenant)
    target = _route(spec, settings, store, storage)
    rec, created = store.create(
        tenant,
        spec,
        idempotency_key,
        message=queue.with_create(target),
        max_queued=settings.tenant_max_queued,
        queue=target,
    )
    if rec.state == JobState.queued and not rec.enqueued:
        try:
            queue.send(rec.id, rec.queue or target)
        except Exception:
            if idempotency_key is None:
                # Nobody can retry this exact job: don't leave it queued forever.
                store.finish(
                    rec,
                    JobState.failed,
                    error=JobError(code=INTERNAL, message="could not enqueue the job; resubmit"),
                )
            raise
    headers = None if created else {"Idempotent-Replayed": "true"}
    return _json(JobPublic.from_record(rec), status.HTTP_202_ACCEPTED, headers)


@router.get(
    "",
    response_model=JobsPublic,
    summary="List jobs (newest first)",
    responses={**_COMMON},
)
def list_jobs(
    tenant: TenantDep,
    store: StoreDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=32, description="next_cursor of the previous page")
    ] = None,
) -> JobsPublic:
    """A page of the caller's jobs; follow ``next_cursor`` for more."""
    try:
        records, next_cursor = store.list_jobs(tenant, state=state, limit=limit, cursor=cursor)
    except ValueError as e:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "cursor"), "msg": str(e), "input": cursor}]
        ) from None
    return JobsPublic(items=[JobPublic.from_record(r) for r in records], next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    summary="Read a job",
    responses={**_COMMON, **_NOT_FOUND},
)
def get_job(job_id: str, tenant: TenantDep, store: StoreDep) -> Response:
    """State, progress, timestamps, error and (once succeeded) the summary."""
    return _json(JobPublic.from_record(store.get(tenant, job_id)))


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    summary="Cancel a job",
    responses={
        **_COMMON,
        **_NOT_FOUND,
        409: {**_ERR, "description": "the job already succeeded or failed"},
    },
)
def cancel_job(job_id: str, tenant: TenantDep, store: StoreDep) -> JobPublic:
    """A queued job is cancelled at once; a running one stops at its next progress report
    (``cancel_requested`` is true until the worker confirms). No artifacts are kept."""
    return JobPublic.from_record(store.request_cancel(tenant, job_id))


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a finished job and its artifacts",
    responses={
        **_COMMON,
        404: {**_ERR, "description": "no such job for this tenant (or already deleted)"},
        409: {**_ERR, "description": "the job is queued or running: cancel it first"},
    },
)
def delete_job(job_id: str, tenant: TenantDep, store: StoreDep, storage: StorageDep) -> None:
    """Delete a succeeded, failed or cancelled job: its record and every object under its
    artifact prefix (``manifest.json`` first). From the moment the request is accepted the job
    reads 404 and no download link can be made for it. A second DELETE answers 404 (the job is
    gone either way; clients may treat it as success). Queued or running jobs answer 409: cancel
    them first. When the object store fails (503) the job stays hidden and the deletion is
    finished by a repeated DELETE or the next expiry sweep."""
    delete_job_everywhere(store, storage, job_id, tenant)


def _require_succeeded(state: JobState) -> None:
    if state != JobState.succeeded:
        raise InvalidTransitionError(f"job is {state.value}; results exist once it succeeded")


@router.get(
    "/{job_id}/report",
    summary="The job's report.json",
    response_model=dict[str, Any],
    responses={
        **_COMMON,
        **_NOT_FOUND,
        409: {**_ERR, "description": "the job has not succeeded"},
        200: {
            "description": "report.json (see lorp/schemas/report.schema.json)",
            "content": {
                "application/json": {
                    "example": {"method": "lorp", "removed": [6, 17, 27], "num_layers": 30}
                }
            },
        },
    },
)
def get_job_report(job_id: str, tenant: TenantDep, store: StoreDep, storage: StorageDep) -> Any:
    """The machine-readable report of a succeeded job."""
    rec = store.get(tenant, job_id)
    _require_succeeded(rec.state)
    return json.loads(storage.get_bytes(job_prefix(rec.tenant, rec.id) + "report.json"))


@router.get(
    "/{job_id}/artifacts",
    response_model=ArtifactsPublic,
    summary="List the job's artifacts with presigned download URLs",
    responses={**_COMMON, **_NOT_FOUND, 409: {**_ERR, "description": "the job has not succeeded"}},
)
def get_job_artifacts(
    job_id: str, tenant: TenantDep, store: StoreDep, storage: StorageDep, settings: SettingsDep
) -> ArtifactsPublic:
    """Every file in the job's manifest (name, size, sha256) plus the manifest itself, each with
    a presigned GET URL valid for ``expires_in`` seconds."""
    rec = store.get(tenant, job_id)
    _require_succeeded(rec.state)
    prefix = job_prefix(rec.tenant, rec.id)
    ttl = settings.presign_ttl_seconds
    items = [
        ArtifactPublic(
            name=a["name"],
            size=int(a["size"]),
            sha256=a["sha256"],
            url=storage.presign_get(prefix + a["name"], ttl),
        )
        for a in rec.artifacts or []
    ]
    return ArtifactsPublic(items=items, expires_in=ttl)
