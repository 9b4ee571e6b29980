"""Sending the ``run_job`` task of a new job to the workers.

The message is the one ``celery.send_task`` would publish (:func:`jobcore.queue.run_job_message`),
pushed onto the broker's Redis list without Celery's publish machinery. When the broker is the job
store's Redis (``LORP_BROKER_URL`` unset or equal to ``LORP_REDIS_URL``), the script that stores a
job pushes its message too: the job is stored and queued together or not at all, in one round trip.
With a separate broker the message is pushed after the job is stored and the job is then marked
enqueued; if that fails, or the process dies in between, the job stays queued but not enqueued, and
a retry with the same ``Idempotency-Key`` sends it.
"""

from __future__ import annotations

from collections.abc import Callable

from redis.exceptions import RedisError

from jobcore.config import Settings
from jobcore.errors import QueueUnavailableError
from jobcore.queue import make_celery, run_job_message
from jobcore.store import JobStore, make_redis
from jobcore.webhooks import WEBHOOK_QUEUE


class JobQueue:
    """The broker side of submitting a job: its run message, and where it is pushed."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.celery = make_celery(settings)
        self.store = store
        self.queues = (settings.cpu_queue, settings.gpu_queue)
        broker = settings.broker_url
        self.broker = make_redis(broker) if broker and broker != settings.redis_url else None

    def message(self, job_id: str, queue: str) -> tuple[str, str]:
        """The broker list ``queue`` and the run message of a job sent there."""
        return queue, run_job_message(self.celery, job_id, queue)

    def with_create(self, queue: str) -> Callable[[str], tuple[str, str]] | None:
        """For :meth:`JobStore.create`: the message to push onto ``queue`` with a new job when
        the broker is the job store (None: a separate broker, :meth:`send` after creating)."""
        if self.broker is not None:
            return None
        return lambda job_id: self.message(job_id, queue)

    def send(self, job_id: str, queue: str) -> None:
        """Queue a stored job that is not enqueued yet onto ``queue`` and mark it enqueued (a
        job store error is a ``RedisError``, a separate broker's :class:`QueueUnavailableError`)."""
        queue, message = self.message(job_id, queue)
        if self.broker is None:
            self.store.enqueue(job_id, queue, message)
            return
        try:
            self.broker.lpush(queue, message)
        except RedisError as e:
            raise QueueUnavailableError(f"job queue unavailable: {e}") from e
        self.store.mark_enqueued(job_id)

    def length(self) -> int:
        """Messages waiting in the broker's lists (every device class's queue)."""
        return sum(self.lengths()[q] for q in self.queues)

    def lengths(self) -> dict[str, int]:
        """Messages waiting in each queue: every device class's and the housekeeper's."""
        redis = self.broker or self.store.redis
        pipe = redis.pipeline(transaction=False)
        names = [*self.queues, WEBHOOK_QUEUE]
        for name in names:
            pipe.llen(name)
        return {name: int(n) for name, n in zip(names, pipe.execute(), strict=True)}

    def close(self) -> None:
        """Close the broker's connection pool (a separate broker only)."""
        if self.broker is not None:
            self.broker.close()
