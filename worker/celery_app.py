"""The Celery application, configured from the same :class:`jobcore.config.Settings` as the API.

Start a worker with ``celery -A worker.celery_app worker --pool prefork --concurrency 1 -Q cpu``
(``-Q gpu`` on a GPU machine: the device-class queues are ``LORP_CPU_QUEUE`` / ``LORP_GPU_QUEUE``;
without ``-Q`` a worker consumes the CPU queue). It advertises the memory it can hold per class
(``worker.tasks``), which the API's routing reads (``jobcore.routing``).
Delivery is at-least-once: ``acks_late`` + ``task_reject_on_worker_lost`` put a job whose worker
process died back on the queue, and the task itself is idempotent (see ``worker.tasks``).

The periodic tasks (job expiry, the webhook and orphan sweeps) belong to ``worker.housekeeper``.
"""

from __future__ import annotations

from jobcore.config import Settings
from jobcore.queue import RUN_JOB_TASK, make_celery

__all__ = ["RUN_JOB_TASK", "app", "settings"]

settings = Settings()  # type: ignore[call-arg]  # fields come from LORP_* (fails fast when bad)
app = make_celery(settings, include=["worker.tasks"])
