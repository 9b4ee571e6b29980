"""The housekeeper: a small Celery app (no torch) that posts job-state webhooks and runs the
fleet's periodic chores: job expiry, the webhook sweep and the orphan sweep.

Start one or more with ``celery -A worker.housekeeper worker -Q lorp.webhooks --pool threads
--concurrency 8`` and exactly one beat (``--beat`` on one of them, or ``celery -A
worker.housekeeper beat``) for the periodic tasks: job expiry (``expire_jobs``: finished jobs
past ``LORP_JOB_RETENTION_SECONDS``, every ``LORP_RETENTION_SWEEP_SECONDS``, off the job queue so
a busy worker never delays it), the webhook sweep, and the orphan sweep that
re-sends a job left ``running`` by a worker that died whole (its run lock expired: no heartbeat)
so a surviving worker takes it at once instead of after the broker's visibility timeout.

Each ``deliver_webhook(job_id, state)`` message is pushed by
``jobcore.store.JobStore.send_events`` once per state a job enters; the task re-checks the URL
against the operator's rules after resolving it, signs the body with the tenant's secret, posts
it, records the attempt on the job, and retries with doubling waits (``acks_late``: a housekeeper
that dies mid-delivery gets the message back). A receiver may therefore see an event more than
once, always with the same ``X-LoRP-Event-Id``.
"""

from __future__ import annotations

import functools
import logging
import time
from datetime import UTC, datetime
from typing import Any

from celery import Task

from jobcore import webhooks
from jobcore.config import Settings
from jobcore.queue import EXPIRE_JOBS_TASK, RUN_JOB_TASK, make_celery
from jobcore.retention import expire_jobs as expire
from jobcore.storage import Storage
from jobcore.store import JobRecord, JobStore

log = logging.getLogger(__name__)

SWEEP_TASK = "lorp.sweep_webhooks"
ORPHANS_TASK = "lorp.requeue_orphans"
#: How often beat runs the sweeps, and how old a pending job must be to be swept.
SWEEP_EVERY_S = 30.0
ORPHANS_EVERY_S = 15.0

settings = Settings()  # type: ignore[call-arg]
app = make_celery(settings, include=["worker.housekeeper"])
app.conf.update(
    task_default_queue=webhooks.WEBHOOK_QUEUE,
    worker_prefetch_multiplier=4,
    beat_schedule={
        "sweep-webhooks": {
            "task": SWEEP_TASK,
            "schedule": SWEEP_EVERY_S,
            "options": {"queue": webhooks.WEBHOOK_QUEUE},
        },
        "expire-jobs": {
            "task": EXPIRE_JOBS_TASK,
            "schedule": float(settings.retention_sweep_seconds),
            # a sweep not started within one interval is dropped; the next does its work
            "options": {
                "queue": webhooks.WEBHOOK_QUEUE,
                "expires": float(settings.retention_sweep_seconds),
            },
        },
        "requeue-orphans": {
            "task": ORPHANS_TASK,
            "schedule": ORPHANS_EVERY_S,
            "options": {"queue": webhooks.WEBHOOK_QUEUE, "expires": ORPHANS_EVERY_S},
        },
    },
)


@functools.cache
def _store() -> JobStore:
    return JobStore.from_settings(settings, for_worker=True)


@functools.cache
def _storage() -> Storage:
    return Storage(settings)


def job_view(rec: JobRecord) -> dict[str, Any]:
    """What an event says of its job (the public fields of ``GET /jobs/{id}`` but the spec)."""
    return {
        "id": rec.id,
        "state": rec.state.value,
        "created_at": rec.created_at,
        "started_at": rec.started_at,
        "finished_at": rec.finished_at,
        "error": rec.error,
        "summary": rec.summary,
        "attempts": rec.attempts,
    }


def deliver(store: JobStore, job_id: str, state: str, attempt: int) -> tuple[bool, bool]:
    """One delivery attempt of a job's ``state`` event; ``(done, retry)``: done when the
    receiver took it (2xx) or it can never be delivered (job gone, URL refused), retry when a
    later attempt may succeed."""
    rec = store.get_any(job_id)
    url = rec.spec.get("callback_url") if rec is not None else None
    if rec is None or not url:
        return True, False  # deleted or expired meanwhile: nothing to tell
    entry: dict[str, Any] = {
        "event_id": webhooks.event_id(job_id, state),
        "state": state,
        "attempt": attempt,
        "at": datetime.now(UTC).isoformat(),
    }
    try:
        target = webhooks.resolve(webhooks.check_url(url, settings), settings)
        secret = webhooks.tenant_secret(settings, rec.tenant)
    except webhooks.CallbackRefusedError as exc:
        retry = "does not resolve" in str(exc)
        store.record_delivery(job_id, {**entry, "ok": False, "status": None, "error": str(exc)})
        return not retry, retry
    body = webhooks.event_body(job_view(rec), state)
    headers = {
        webhooks.SIGNATURE_HEADER: webhooks.sign(secret, int(time.time()), body),
        webhooks.EVENT_ID_HEADER: entry["event_id"],
    }
    result = webhooks.post(target, body, headers, settings.webhook_timeout_seconds)
    store.record_delivery(
        job_id,
        {
            **entry,
            "ok": result.ok,
            "status": result.status,
            "error": result.error,
            "seconds": round(result.seconds, 3),
        },
    )
    return result.ok, not result.ok


@app.task(name=webhooks.DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def deliver_webhook(self: Task, job_id: str, state: str) -> str:
    """Post one event; retried with backoff until delivered or ``webhook_max_attempts``."""
    attempt = self.request.retries + 1
    done, retry = deliver(_store(), job_id, state, attempt)
    if done:
        return "delivered"
    if retry and attempt < settings.webhook_max_attempts:
        raise self.retry(
            countdown=webhooks.backoff_seconds(attempt, settings),
            max_retries=settings.webhook_max_attempts - 1,
        )
    log.warning("job %s: event %s not delivered after %d attempts", job_id, state, attempt)
    _store().record_delivery(
        job_id,
        {
            "event_id": webhooks.event_id(job_id, state),
            "state": state,
            "attempt": attempt,
            "at": datetime.now(UTC).isoformat(),
            "ok": False,
            "status": None,
            "error": "gave up",
            "final": True,
        },
    )
    return "gave up"


@app.task(name=SWEEP_TASK)
def sweep_webhooks() -> int:
    """Push events a crash left unsent (:meth:`jobcore.store.JobStore.sweep_events`)."""
    return _store().sweep_events(older_than_s=SWEEP_EVERY_S)


@app.task(name=ORPHANS_TASK)
def requeue_orphans() -> int:
    """Re-send the run message of every job left ``running`` without a live run lock (its
    worker died whole); duplicates are harmless (the run lock and the terminal-state check make
    ``run_job`` idempotent). The number re-sent."""
    store = _store()
    orphans = [store.get_any(job_id) for job_id in store.orphaned_running()]
    sent = 0
    for rec in orphans:
        if rec is None:
            continue
        log.warning("job %s: running without a live worker; re-enqueueing", rec.id)
        # the queue of the pool it was routed to (jobcore.routing)
        app.send_task(RUN_JOB_TASK, args=[rec.id], queue=rec.queue or settings.cpu_queue)
        sent += 1
    return sent


@app.task(name=EXPIRE_JOBS_TASK)
def expire_jobs() -> dict[str, int]:
    """Delete finished jobs older than ``LORP_JOB_RETENTION_SECONDS`` and finish interrupted
    deletions (:func:`jobcore.retention.expire_jobs`)."""
    result = expire(_store(), _storage(), settings.retention)
    return {"deleted": len(result.deleted), "failed": len(result.failed)}
