"""The Celery task: ``run_job(job_id)``. Thin on purpose — the
job record holds all state and ``worker.runner.JobRunner`` does the work; the task is idempotent,
so a redelivered message (``acks_late`` + reject on worker loss) is harmless.

A job whose tenant already has ``LORP_TENANT_MAX_RUNNING`` jobs running is deferred: the task
re-queues itself with a countdown (:data:`DEFER_SECONDS`) and the job stays queued; the limit is
checked in the same Redis script that would start it, so it is never exceeded nor the job run
twice, and the worker takes the next message meanwhile (another tenant's job gets the slot)."""

from __future__ import annotations

import functools
import logging

from celery import Task
from celery.signals import worker_init, worker_ready
from redis.exceptions import RedisError

from jobcore.storage import Storage
from jobcore.store import JobStore
from worker.celery_app import RUN_JOB_TASK, app, settings
from worker.runner import JobRunner

log = logging.getLogger(__name__)

BUSY_RETRY_SECONDS = 5
DEFER_SECONDS = 10  # a job over its tenant's running limit is looked at again after this


@worker_init.connect
def _preload(**_: object) -> None:
    """Import the heavy modules (torch, transformers, lorp) once in the main process, so pool
    processes forked later - including replacements of a killed one - start warm."""
    # transformers imports lazily: the auto classes and the Llama family (SmolLM2 and most
    # small models) cost ~9 s on first use, which a replacement pool process would pay again
    # inside its first job (measured by benchmarks/reliability).
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import lorp.loading
    import lorp.pipeline  # noqa: F401


@worker_ready.connect
def _requeue_orphans(**_: object) -> None:
    """Re-send jobs left running by a worker that died whole (main process included): their
    unacked messages would only come back after the visibility timeout. Duplicates are harmless
    (the run lock and the terminal-state check make the task idempotent)."""
    try:
        store = JobStore.from_settings(settings, for_worker=True)
        orphans = store.orphaned_running()
        store.close()
    except RedisError as e:
        log.warning("could not look for orphaned jobs: %s", e)
        return
    for job_id in orphans:
        log.warning("job %s: running without a live worker; re-enqueueing", job_id)
        app.send_task(RUN_JOB_TASK, args=[job_id])


@functools.cache
def _runner() -> JobRunner:
    """One runner (Redis pool, S3 client) per worker process, built after the fork."""
    return JobRunner(settings, JobStore.from_settings(settings, for_worker=True), Storage(settings))


@app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Task, job_id: str) -> str:
    """Run one pruning job by id (tenant and spec come from the job record)."""
    outcome = _runner().run(job_id)
    if outcome == "busy":
        # Another process holds the run lock (e.g. a redelivery racing a dying worker):
        # look again once the lock has had time to expire.
        raise self.retry(countdown=BUSY_RETRY_SECONDS, max_retries=360)
    if outcome == "deferred":
        # Its tenant is at its running limit: the job stays queued; come back later.
        raise self.retry(countdown=DEFER_SECONDS, max_retries=None)
    log.info("job %s: %s", job_id, outcome)
    return outcome
