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
import os
from typing import Any

from celery import Task
from celery.signals import worker_init, worker_ready, worker_shutdown
from redis.exceptions import RedisError

from jobcore.storage import Storage
from jobcore.store import JobStore
from worker.celery_app import RUN_JOB_TASK, app, settings
from worker.pool import Advertiser, device_classes, memory_bytes
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


_advertiser: list[Advertiser] = []


@worker_ready.connect
def _advertise(sender: Any = None, **_: object) -> None:
    """Advertise, per device class whose queue this worker consumes, the memory it can hold;
    the API refuses at submission a model no pool can hold (jobcore.routing)."""
    consumer = getattr(sender, "task_consumer", None)
    queues = [q.name for q in getattr(consumer, "queues", [])] or [settings.cpu_queue]
    offers = {}
    for device_class in device_classes(queues, settings):
        size = memory_bytes(device_class, settings)
        if size is not None:
            offers[device_class] = size
    if not offers:
        return
    hostname = str(getattr(sender, "hostname", None) or os.getpid())
    advertiser = Advertiser(JobStore.from_settings(settings, for_worker=True), hostname, offers)
    try:
        advertiser.advertise()
    except RedisError as e:
        log.warning("could not advertise this worker's memory: %s", e)
    advertiser.start()
    _advertiser.append(advertiser)
    log.info("advertised %s on queues %s", offers, queues)


@worker_shutdown.connect
def _withdraw(**_: object) -> None:
    for advertiser in _advertiser:
        advertiser.stop()


@worker_ready.connect
def _requeue_orphans(**_: object) -> None:
    """Re-send jobs left running by a worker that died whole (main process included): their
    unacked messages would only come back after the visibility timeout. Duplicates are harmless
    (the run lock and the terminal-state check make the task idempotent)."""
    try:
        store = JobStore.from_settings(settings, for_worker=True)
        orphans = [store.get_any(job_id) for job_id in store.orphaned_running()]
        store.close()
    except RedisError as e:
        log.warning("could not look for orphaned jobs: %s", e)
        return
    for rec in orphans:
        if rec is None:
            continue
        log.warning("job %s: running without a live worker; re-enqueueing", rec.id)
        app.send_task(RUN_JOB_TASK, args=[rec.id], queue=rec.queue or settings.cpu_queue)


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
