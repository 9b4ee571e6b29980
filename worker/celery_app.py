"""The Celery application, configured from the same :class:`jobcore.config.Settings` as the API.

Start a worker with ``celery -A worker.celery_app worker --pool prefork --concurrency 1``.
Delivery is at-least-once: ``acks_late`` + ``task_reject_on_worker_lost`` put a job whose worker
process died back on the queue, and the task itself is idempotent (see ``worker.tasks``).

``celery -A worker.celery_app beat`` (one process per deployment) sends ``expire_jobs`` every
``LORP_RETENTION_SWEEP_SECONDS``; a sweep not started within one interval (the workers busy) is
dropped, the next one does its work.
"""

from __future__ import annotations

from jobcore.config import Settings
from jobcore.queue import EXPIRE_JOBS_TASK, QUEUE, RUN_JOB_TASK, make_celery

__all__ = ["EXPIRE_JOBS_TASK", "QUEUE", "RUN_JOB_TASK", "app", "settings"]

settings = Settings()  # type: ignore[call-arg]  # fields come from LORP_* (fails fast when bad)
app = make_celery(settings, include=["worker.tasks"])
app.conf.beat_schedule = {
    "lorp-expire-jobs": {
        "task": EXPIRE_JOBS_TASK,
        "schedule": float(settings.retention_sweep_seconds),
        "options": {"expires": float(settings.retention_sweep_seconds)},
    }
}
