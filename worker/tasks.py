"""The Celery task: ``run_job(job_id)``. Thin on purpose — the job record holds all state and
``worker.runner.JobRunner`` does the work; the task is idempotent, so a redelivered message
(``acks_late`` + reject on worker loss) is harmless."""

from __future__ import annotations

import functools
import logging

from celery import Task

from service.jobs import JobStore
from service.storage import Storage
from worker.celery_app import RUN_JOB_TASK, app, settings
from worker.runner import JobRunner

log = logging.getLogger(__name__)

BUSY_RETRY_SECONDS = 10


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
    log.info("job %s: %s", job_id, outcome)
    return outcome
