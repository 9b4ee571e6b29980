"""The job store's quotas, deletion and rate limit against a real redis-server (no mocks): a
submission over the queued quota stores nothing, the running limit holds a job queued, a
deletion hides a finished job (indexes and idempotency key included) and never touches a queued
or running one, the finished index finds only expired finished jobs, the token bucket, and the
worker deferring a job whose tenant is at its running limit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from devstack import RedisServer
from jobcore.config import Settings
from jobcore.errors import (
    InvalidTransitionError,
    JobNotFoundError,
    QuotaExceededError,
)
from jobcore.spec import JobCreate, JobState
from jobcore.storage import Storage
from jobcore.store import DELETING_KEY, FINISHED_KEY, JobStore, make_redis
from worker.runner import JobRunner

TENANT, OTHER = "acme", "globex"
SPEC = JobCreate.model_validate(
    {"model": "s3://inputs/acme/models/tiny", "calibration": "corpus:wiki", "budget": {"blocks": 2}}
)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def db(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushall()
    yield r
    r.close()


@pytest.fixture
def store(redis_url: str, db: redis.Redis) -> Iterator[JobStore]:
    s = JobStore(make_redis(redis_url))
    yield s
    s.close()


def _snapshot(db: redis.Redis) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in sorted(db.scan_iter("*")):
        kind = db.type(key)
        out[key] = db.hgetall(key) if kind == "hash" else db.dump(key)
    return out


def test_queued_quota_refuses_and_stores_nothing(store: JobStore, db: redis.Redis) -> None:
    first, _ = store.create(TENANT, SPEC, "key-1", max_queued=2)
    store.create(TENANT, SPEC, max_queued=2)
    before = _snapshot(db)
    with pytest.raises(QuotaExceededError) as err:
        store.create(TENANT, SPEC, "key-3", max_queued=2)
    assert err.value.code == "quota_exceeded" and err.value.retry_after > 0
    assert "2 queued jobs" in str(err.value) and "tenant_max_queued=2" in str(err.value)
    assert _snapshot(db) == before  # no record, no index entry, no seq, no idempotency key
    # a retry of a stored job still answers it; another tenant has its own quota
    again, created = store.create(TENANT, SPEC, "key-1", max_queued=2)
    assert not created and again.id == first.id
    store.create(OTHER, SPEC, max_queued=2)
    # once one of them starts, there is room again
    assert store.start(first)
    store.create(TENANT, SPEC, max_queued=2)


def test_running_limit_holds_the_job_queued(store: JobStore) -> None:
    a, _ = store.create(TENANT, SPEC)
    b, _ = store.create(TENANT, SPEC)
    c, _ = store.create(OTHER, SPEC)
    assert store.start(a, max_running=1)
    with pytest.raises(QuotaExceededError, match="tenant_max_running=1"):
        store.start(b, max_running=1)
    held = store.get(TENANT, b.id)
    assert held.state == JobState.queued and held.attempts == 0 and held.started_at is None
    assert store.start(c, max_running=1)  # another tenant is not held up
    # a redelivered running job is no new start: the limit does not apply to it
    assert store.start(store.get(TENANT, a.id), max_running=1)
    assert store.finish(store.get(TENANT, a.id), JobState.succeeded)
    assert store.start(b, max_running=1)
    assert store.get(TENANT, b.id).state == JobState.running


def test_delete_hides_only_finished_jobs(store: JobStore, db: redis.Redis) -> None:
    queued, _ = store.create(TENANT, SPEC)
    running, _ = store.create(TENANT, SPEC)
    done, _ = store.create(TENANT, SPEC, "retry-me")
    assert store.start(running) and store.start(done)
    assert store.finish(store.get(TENANT, done.id), JobState.succeeded)
    for job in (queued, running):
        with pytest.raises(InvalidTransitionError, match="cancel it first"):
            store.begin_delete(job.id, TENANT)
    with pytest.raises(JobNotFoundError):
        store.begin_delete(done.id, OTHER)
    assert db.zscore(FINISHED_KEY, done.id) is not None
    assert db.zscore(FINISHED_KEY, queued.id) is None

    store.begin_delete(done.id, TENANT)
    with pytest.raises(JobNotFoundError):
        store.get(TENANT, done.id)
    listed, _ = store.list_jobs(TENANT)
    assert {r.id for r in listed} == {queued.id, running.id}
    assert store.list_jobs(TENANT, state=JobState.succeeded)[0] == []
    assert db.zscore(FINISHED_KEY, done.id) is None
    assert store.deleting_ids(time.time() + 1) == [done.id]
    assert not list(db.scan_iter("lorp:idem:*"))  # the key may be used for a new job
    # an interrupted deletion can be taken up again, then the record goes
    store.begin_delete(done.id, TENANT)
    store.purge(done.id)
    assert store.get_any(done.id) is None and store.deleting_ids(time.time() + 1) == []
    with pytest.raises(JobNotFoundError):
        store.begin_delete(done.id, TENANT)
    fresh, created = store.create(TENANT, SPEC, "retry-me")
    assert created and fresh.id != done.id
    # the queued and running jobs are untouched
    assert store.get(TENANT, queued.id).state == JobState.queued
    assert store.get(TENANT, running.id).state == JobState.running


def test_finished_index_finds_expired_finished_jobs(store: JobStore) -> None:
    cancelled, _ = store.create(TENANT, SPEC)
    failed, _ = store.create(OTHER, SPEC)
    queued, _ = store.create(TENANT, SPEC)
    running, _ = store.create(TENANT, SPEC)
    store.request_cancel(TENANT, cancelled.id)  # queued -> cancelled at once
    assert store.start(failed) and store.finish(store.get(OTHER, failed.id), JobState.failed)
    assert store.start(running)
    finished_at = datetime.fromisoformat(store.get(OTHER, failed.id).finished_at or "")
    now = time.time()
    assert abs(finished_at.timestamp() - now) < 60
    assert set(store.expired_ids(now + 1)) == {cancelled.id, failed.id}
    assert store.expired_ids(now - 3600) == []
    assert len(store.expired_ids(datetime.now(UTC).timestamp() + 1, limit=1)) == 1
    assert db_state(store, queued.id) == "queued" and db_state(store, running.id) == "running"


def db_state(store: JobStore, job_id: str) -> str:
    rec = store.get_any(job_id)
    assert rec is not None
    return rec.state.value


def test_deleting_index_is_separate(store: JobStore, db: redis.Redis) -> None:
    job, _ = store.create(TENANT, SPEC)
    store.request_cancel(TENANT, job.id)
    store.begin_delete(job.id)  # any tenant: the expiry path
    assert db.zscore(DELETING_KEY, job.id) is not None
    assert store.deleting_ids(time.time() - 3600) == []  # began just now: not stale


def test_token_bucket_per_key(store: JobStore) -> None:
    waits = [store.take_token("key-one-000000", 2.0, 3) for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert 0.0 < waits[3] <= 0.5  # one token comes back every 0.5 s
    assert store.take_token("key-two-000000", 2.0, 3) == 0.0  # its own bucket
    time.sleep(0.6)
    assert store.take_token("key-one-000000", 2.0, 3) == 0.0


def _never(*_: object, **__: object) -> None:
    raise AssertionError("a deferred job must not run")


def test_worker_defers_a_job_over_the_running_limit(
    store: JobStore, redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=redis_url,
        s3_access_key_id="ak",  # type: ignore[arg-type]
        s3_secret_access_key="sk",  # type: ignore[arg-type]
        s3_bucket="lorp-test",
        api_keys={"acme-key-0123456789": TENANT},
        work_dir=tmp_path / "work",
        tenant_max_running=1,
    )
    first, _ = store.create(TENANT, SPEC)
    second, _ = store.create(TENANT, SPEC)
    assert store.start(first)
    runner = JobRunner(settings, store, Storage(settings), pipeline=_never)
    assert runner.run(second.id) == "deferred"
    rec = store.get(TENANT, second.id)
    assert rec.state == JobState.queued and rec.attempts == 0
    assert store.lock_holder(second.id) is None  # the next try can take it
