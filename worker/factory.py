"""Celery app factory (no side effects on import; ``worker.celery_app`` builds the app)."""

from __future__ import annotations

from celery import Celery

from service.config import Settings

RUN_JOB_TASK = "lorp.run_job"
QUEUE = "lorp"


def make_celery(settings: Settings) -> Celery:
    """A Celery app on ``LORP_BROKER_URL`` (the API uses one only to send tasks)."""
    app = Celery("lorp", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=QUEUE,
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
