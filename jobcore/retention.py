"""Deleting finished jobs: ``DELETE /jobs/{id}`` (the API) and expiry (the worker's periodic
``expire_jobs`` task the housekeeper's beat sends).

Order of one deletion, so no reader ever sees a half-deleted job as a result:

1. :meth:`JobStore.begin_delete` hides the record (atomically, and only when the job is
   finished: a queued or running job is never touched): reads answer 404, listings skip it, no
   one can presign its artifacts any more, and the id is remembered in ``lorp:deleting``.
2. ``manifest.json`` is deleted first: it is the commit point (written last by the worker), so
   from here on the prefix no longer claims a complete result to anyone reading the bucket.
3. Every other object under ``<tenant>/jobs/<id>/``, then the record (:meth:`JobStore.purge`).

When the object store fails in step 2 or 3 the job stays hidden and listed as deleting; the
next sweep (or a repeated DELETE) finishes it. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from jobcore.errors import InvalidTransitionError, JobNotFoundError, StorageError
from jobcore.storage import MANIFEST, Storage, job_prefix
from jobcore.store import JobRecord, JobStore

log = logging.getLogger(__name__)

#: A deletion older than this that never finished is taken over by the sweep (a DELETE in
#: flight finishes its own well within it).
STALE_DELETE_SECONDS = 300.0


def delete_job(store: JobStore, storage: Storage, job_id: str, tenant: str | None) -> JobRecord:
    """Delete a finished job's artifacts and record (``tenant`` None: any tenant's); see the
    module docstring for the order. Raises :class:`JobNotFoundError` (missing, another
    tenant's, already deleted), :class:`InvalidTransitionError` (queued or running) or a
    :class:`StorageError` (the job then stays hidden and the next sweep finishes it)."""
    rec = store.begin_delete(job_id, tenant)
    prefix = job_prefix(rec.tenant, rec.id)
    storage.delete(prefix + MANIFEST)
    storage.delete_prefix(prefix)
    store.purge(rec.id)
    return rec


@dataclass
class ExpiryResult:
    """What one sweep did."""

    deleted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def expire_jobs(
    store: JobStore,
    storage: Storage,
    retention_seconds: int | None,
    *,
    now: float | None = None,
    batch: int = 500,
) -> ExpiryResult:
    """Delete every job that finished more than ``retention_seconds`` before ``now`` (None:
    none expire), and finish deletions interrupted more than :data:`STALE_DELETE_SECONDS` ago.
    Only finished jobs are ever in the indexes read here, and :meth:`JobStore.begin_delete`
    checks the state again in the same step that hides a job: queued and running jobs stay.
    One failed deletion (object store down) does not stop the others."""
    now = time.time() if now is None else now
    result = ExpiryResult()
    candidates = store.deleting_ids(now - STALE_DELETE_SECONDS, batch)
    if retention_seconds:
        candidates += store.expired_ids(now - retention_seconds, batch)
    for job_id in dict.fromkeys(candidates):
        try:
            delete_job(store, storage, job_id, None)
        except JobNotFoundError:
            if store.get_any(job_id) is None:
                store.purge(job_id)  # an index entry without a record: drop it
            continue
        except InvalidTransitionError:
            continue  # never a job that is not finished
        except StorageError as e:
            log.warning("job %s: artifacts not deleted (retried next sweep): %s", job_id, e)
            result.failed.append(job_id)
            continue
        result.deleted.append(job_id)
    if result.deleted or result.failed:
        log.info("expiry: %d jobs deleted, %d left for the next sweep", len(result.deleted),
                 len(result.failed))  # fmt: skip
    return result
