"""Errors of the job core (job store, queue, object storage) and the job error codes the API
reports besides the library's.

``lorp.errors`` classes carry their own ``.code``; the codes below are the service's own.
"""

from __future__ import annotations

# Job error codes produced by the service/worker (besides ``lorp.errors.*.code``).
STORAGE_UNAVAILABLE = "storage_unavailable"
INPUT_NOT_FOUND = "input_not_found"
INPUT_NOT_ALLOWED = "input_not_allowed"
INTERNAL = "internal"
WORKER_LOST = "worker_lost"
WORK_DISK_FULL = "work_disk_full"


class ServiceError(Exception):
    """Base class; ``code`` is stable and shown to API clients."""

    code = "service_error"


class JobNotFoundError(ServiceError):
    """No such job for this tenant (other tenants' jobs are indistinguishable from missing)."""

    code = "not_found"


class IdempotencyConflictError(ServiceError):
    """The Idempotency-Key was already used with a different request body."""

    code = "idempotency_conflict"


class InvalidTransitionError(ServiceError):
    """The job is not in a state that allows the requested transition."""

    code = "invalid_state"


class QueueUnavailableError(ServiceError):
    """The broker could not be reached to queue a job."""

    code = "queue_unavailable"


class InputNotAllowedError(ServiceError):
    """A job's input lies outside the locations its tenant was granted (checked again by the
    worker right before it reads, in case the settings changed since submission)."""

    code = INPUT_NOT_ALLOWED


class StorageError(ServiceError):
    """The object store refused an operation."""

    code = "storage_error"


class StorageUnavailableError(StorageError):
    """The object store could not be reached (after retries)."""

    code = STORAGE_UNAVAILABLE


class StorageNotFoundError(StorageError):
    """An object or prefix does not exist."""

    code = INPUT_NOT_FOUND


class QuotaExceededError(ServiceError):
    """A tenant limit was reached (``tenant_max_queued`` at submission, ``tenant_max_running``
    when a worker would start the job); ``retry_after`` seconds is a hint for the client."""

    code = "quota_exceeded"

    def __init__(self, message: str, retry_after: int = 30) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitedError(QuotaExceededError):
    """The API key sent requests faster than ``rate_limit_per_second`` allows."""

    code = "rate_limited"
