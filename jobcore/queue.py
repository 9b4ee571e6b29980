"""The queue message of a job: the Celery app both sides configure, and the ``run_job`` message.

The API builds the message (:func:`run_job_message`) and pushes it (``service.queue``); the
worker builds its Celery app here too (``worker.celery_app``, which adds its task module) and
consumes it. No side effects on import.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from celery import Celery
from kombu import serialization
from kombu.entity import maybe_delivery_mode
from kombu.utils.json import dumps
from kombu.utils.uuid import uuid

from jobcore.config import Settings
from jobcore.webhooks import DELIVER_TASK, WEBHOOK_QUEUE

RUN_JOB_TASK = "lorp.run_job"
EXPIRE_JOBS_TASK = "lorp.expire_jobs"


def make_celery(settings: Settings, *, include: Sequence[str] = ()) -> Celery:
    """A Celery app on ``LORP_BROKER_URL`` (the API uses one only to build task messages; the
    worker's names its task modules in ``include``). A worker started without ``-Q`` consumes
    the CPU pool's queue (``Settings.cpu_queue``)."""
    app = Celery("lorp", broker=settings.broker_url, include=list(include))
    app.conf.update(
        task_default_queue=settings.cpu_queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_track_started=False,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_pool="prefork",
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2.0,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        # Sending from the API: give up quickly (the route answers 503) instead of hanging.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        enable_utc=True,
    )
    return app


def run_job_message(app: Celery, job_id: str, queue: str) -> str:
    """The message that ``app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)`` pushes
    (LPUSH) onto the Redis list ``queue`` (a device class's, ``jobcore.routing``): Celery's task
    message (protocol 2, from ``app.amqp``) in kombu's
    Redis transport envelope, with new task id and delivery tag (:func:`task_message`).

    Built without Celery's publish machinery (a producer from the pool, a retry wrapper, a new
    Redis client per message: 0.45 ms of CPU per job here), so the API can push it in the same
    Redis script that stores the job. ``tests/integration/test_job_queue.py`` checks that it
    equals what ``send_task`` pushes, but for the ids.
    """
    return task_message(app, RUN_JOB_TASK, [job_id], queue)


def webhook_message(app: Celery, job_id: str, state: str) -> tuple[str, str]:
    """The broker list and the message of the webhook delivery of a job's ``state`` event
    (``worker.housekeeper`` consumes :data:`jobcore.webhooks.WEBHOOK_QUEUE`)."""
    return WEBHOOK_QUEUE, task_message(app, DELIVER_TASK, [job_id, state], WEBHOOK_QUEUE)


def task_message(app: Celery, task: str, args: list[str], queue: str) -> str:
    """Celery's message for ``task(*args)`` in kombu's Redis envelope, for the list ``queue``
    (see :func:`run_job_message`)."""
    task_id = uuid()
    headers, properties, body, _ = app.amqp.create_task_message(
        task_id, task, args, {}, reply_to=app.thread_oid, ignore_result=None
    )
    content_type, content_encoding, data = serialization.dumps(
        body, serializer=app.conf.task_serializer
    )
    return str(
        dumps(
            {
                "body": base64.b64encode(data.encode(content_encoding)).decode("ascii"),
                "content-encoding": content_encoding,
                "content-type": content_type,
                "headers": headers,
                "properties": {
                    **properties,
                    "delivery_mode": maybe_delivery_mode(app.conf.task_default_delivery_mode),
                    "delivery_info": {"exchange": "", "routing_key": queue},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": uuid(),
                },
            }
        )
    )
