"""Response models of the REST API (pydantic): ``JobPublic`` / ``JobsPublic`` (a job as a client
sees it), artifacts, errors and health. What a client sends, and what the job record holds (the
job spec ``JobCreate``, ``JobState``, ``JobError``, ``JobSummary``), is defined once in
:mod:`jobcore.spec`, shared with the worker.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jobcore.spec import JobCreate, JobError, JobState, JobSummary
from jobcore.store import JobRecord


class Progress(BaseModel):
    """Where a job is: stage name, fraction done within that stage, a human message."""

    stage: str | None = Field(default=None, examples=["calibration"])
    fraction: float = Field(default=0.0, ge=0.0, le=1.0, examples=[0.5])
    message: str = Field(default="", examples=["window 16/32"])


_JOB_EXAMPLE: dict[str, Any] = {
    "id": "4f6c2e1a9b8d4c3e8f7a6b5c4d3e2f1a",
    "state": "running",
    "created_at": "2026-01-01T12:00:00Z",
    "started_at": "2026-01-01T12:00:01Z",
    "finished_at": None,
    "progress": {"stage": "calibration", "fraction": 0.5, "message": "window 16/32"},
    "error": None,
    "summary": None,
    "cancel_requested": False,
    "attempts": 1,
    "spec": JobCreate.model_config["json_schema_extra"]["examples"][0],  # type: ignore[index]
}


class WebhookDelivery(BaseModel):
    """One attempt to post a job-state event to the job's ``callback_url``."""

    event_id: str = Field(examples=["4f6c2e1a9b8d4c3e8f7a6b5c4d3e2f1a.running"])
    state: JobState
    attempt: int = Field(ge=1, description="1 for the first POST of this event")
    at: datetime
    ok: bool = Field(description="the receiver answered 2xx")
    status: int | None = Field(default=None, description="the receiver's HTTP status")
    error: str | None = None
    seconds: float | None = None
    final: bool = Field(default=False, description="the last attempt: the notifier gave up")


class JobPublic(BaseModel):
    """A job as the API shows it."""

    model_config = ConfigDict(json_schema_extra={"examples": [_JOB_EXAMPLE]})

    id: str
    state: JobState
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress = Field(default_factory=Progress)
    error: JobError | None = None
    summary: JobSummary | None = None
    cancel_requested: bool = False
    attempts: int = 0
    spec: JobCreate
    deliveries: list[WebhookDelivery] = Field(
        default_factory=list,
        description="webhook delivery attempts, oldest first (jobs with a callback_url)",
    )

    @classmethod
    def from_record(cls, rec: JobRecord) -> JobPublic:
        """The API view of a stored job (no tenant, no internals)."""
        return cls(
            id=rec.id,
            state=rec.state,
            created_at=datetime.fromisoformat(rec.created_at),
            started_at=datetime.fromisoformat(rec.started_at) if rec.started_at else None,
            finished_at=datetime.fromisoformat(rec.finished_at) if rec.finished_at else None,
            progress=Progress.model_validate(rec.progress) if rec.progress else Progress(),
            error=JobError.model_validate(rec.error) if rec.error else None,
            summary=JobSummary.model_validate(rec.summary) if rec.summary else None,
            cancel_requested=rec.cancel_requested,
            attempts=rec.attempts,
            spec=JobCreate.model_validate(rec.spec),
            deliveries=[WebhookDelivery.model_validate(d) for d in rec.deliveries],
        )


class JobsPublic(BaseModel):
    """One page of jobs, newest first; pass ``next_cursor`` back as ``cursor`` for the next."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [_JOB_EXAMPLE], "next_cursor": "17"}]}
    )

    items: list[JobPublic]
    next_cursor: str | None = None


class ArtifactPublic(BaseModel):
    """One file of a succeeded job, with a presigned download URL."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "model/model.safetensors",
                    "size": 1048576,
                    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "url": "https://s3.example.com/lorp/acme/jobs/4f6c/model/model.safetensors?X-Amz-...",
                }
            ]
        }
    )

    name: str
    size: int
    sha256: str
    url: str


class ArtifactsPublic(BaseModel):
    """Every artifact of a job (from its manifest); URLs expire after ``expires_in`` seconds."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "name": "report.json",
                            "size": 18234,
                            "sha256": "2c26b46b68ffc68ff99b453c1d30413413422d70"
                            "6483bfa0f98a5e886266e7ae",
                            "url": "https://s3.example.com/lorp/acme/jobs/4f6c/report.json?X-Amz-...",
                        }
                    ],
                    "expires_in": 3600,
                }
            ]
        }
    )

    items: list[ArtifactPublic]
    expires_in: int


class ErrorResponse(BaseModel):
    """Body of every non-validation error response."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"detail": "job not found", "code": "not_found"}]}
    )

    detail: str
    code: str


class HealthResponse(BaseModel):
    """Liveness/readiness answer; ``checks`` names each dependency and whether it answered."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"status": "ok", "checks": {"redis": True, "s3": True}},
                {"status": "unavailable", "checks": {"redis": False, "s3": True}},
            ]
        }
    )

    status: Literal["ok", "unavailable"]
    checks: dict[str, bool] = Field(default_factory=dict)
