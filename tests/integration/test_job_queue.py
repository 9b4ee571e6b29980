"""Queueing a new job's run task (service.queue) against a real redis-server: the message equals
what Celery's own ``send_task`` publishes, and it is pushed exactly once, together with the job
when the broker is the job store's Redis, after it otherwise."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from devstack import RedisServer
from jobcore.config import Settings
from jobcore.errors import IdempotencyConflictError
from jobcore.queue import RUN_JOB_TASK, make_celery, run_job_message
from jobcore.spec import JobCreate
from jobcore.store import JobStore
from service.queue import JobQueue

pytestmark = pytest.mark.integration

TENANT = "acme"
QUEUE = "cpu"  # Settings.cpu_queue's default
SPEC = JobCreate.model_validate(
    {"model": "s3://inputs/acme/models/tiny", "calibration": "corpus:wiki", "budget": {"blocks": 2}}
)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


def _settings(redis_url: str, broker_url: str | None = None) -> Settings:
    return Settings(
        redis_url=redis_url,
        broker_url=broker_url,
        s3_access_key_id="ak",
        s3_secret_access_key="sk",
        s3_bucket="lorp-artifacts",
        api_keys={"k" * 16: TENANT},
    )


@pytest.fixture
def db(redis_url: str) -> Iterator[redis.Redis]:
    """Database 0 (the job store) of the server; every database is emptied first."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushall()
    yield r
    r.close()


def _without_ids(message: str) -> dict[str, Any]:
    out = json.loads(message)
    out["headers"]["id"] = out["headers"]["root_id"] = None
    out["properties"]["correlation_id"] = out["properties"]["delivery_tag"] = None
    return dict(out)


def test_run_job_message_is_what_send_task_publishes(redis_url: str, db: redis.Redis) -> None:
    celery = make_celery(_settings(redis_url))
    job_id = "0123456789abcdef" * 2
    celery.send_task(RUN_JOB_TASK, args=[job_id], queue=QUEUE)
    published = db.lpop(QUEUE)
    assert isinstance(published, str)
    ours = run_job_message(celery, job_id, QUEUE)
    assert _without_ids(ours) == _without_ids(published)
    assert list(json.loads(ours)) == list(json.loads(published))  # same envelope layout
    assert json.loads(ours)["headers"]["id"] != json.loads(published)["headers"]["id"]


def test_job_and_message_are_stored_together_once(redis_url: str, db: redis.Redis) -> None:
    settings = _settings(redis_url)
    store = JobStore.from_settings(settings)
    queue = JobQueue(settings, store)
    try:
        assert queue.broker is None and queue.with_create(QUEUE) is not None
        rec, created = store.create(
            TENANT, SPEC, "key-1", message=queue.with_create(QUEUE), queue=QUEUE
        )
        assert rec.queue == QUEUE
        assert created and rec.enqueued
        assert db.hget(f"lorp:job:{rec.id}", "enqueued") == "1"
        (message,) = db.lrange(QUEUE, 0, -1)
        assert json.loads(message)["headers"]["argsrepr"] == repr([rec.id])
        # A retry with the key returns the stored job and queues nothing more.
        again, created = store.create(TENANT, SPEC, "key-1", message=queue.with_create(QUEUE))
        assert not created and again == rec
        assert db.llen(QUEUE) == 1 and queue.length() == 1
        with pytest.raises(IdempotencyConflictError):
            store.create(
                TENANT,
                SPEC.model_copy(update={"windows": 3}),
                "key-1",
                message=queue.with_create(QUEUE),
            )
        # A job stored without its message (an older API) is queued once by send().
        legacy, _ = store.create(TENANT, SPEC)
        assert not legacy.enqueued
        queue.send(legacy.id, QUEUE)
        queue.send(legacy.id, QUEUE)
        assert db.llen(QUEUE) == 2
        assert store.get(TENANT, legacy.id).enqueued
        assert store.enqueue(legacy.id, QUEUE, "unused") is False
    finally:
        queue.close()
        store.close()


def test_separate_broker_gets_the_message_after_the_job(redis_url: str, db: redis.Redis) -> None:
    settings = _settings(redis_url, broker_url=redis_url.removesuffix("/0") + "/1")
    store = JobStore.from_settings(settings)
    queue = JobQueue(settings, store)
    broker = redis.Redis.from_url(str(settings.broker_url), decode_responses=True)
    try:
        assert queue.broker is not None and queue.with_create(QUEUE) is None
        rec, created = store.create(TENANT, SPEC, message=queue.with_create(QUEUE))
        assert created and not rec.enqueued and db.llen(QUEUE) == 0
        queue.send(rec.id, QUEUE)
        assert store.get(TENANT, rec.id).enqueued
        (message,) = broker.lrange(QUEUE, 0, -1)
        assert json.loads(message)["headers"]["argsrepr"] == repr([rec.id])
        assert db.llen(QUEUE) == 0 and queue.length() == 1
    finally:
        broker.close()
        queue.close()
        store.close()
