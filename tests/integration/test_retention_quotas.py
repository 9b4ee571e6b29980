"""Retention and quotas against the real stack: ``DELETE /jobs/{id}`` removes a finished job's
objects from SeaweedFS and its record; the expiry sweep removes only expired finished jobs while a
running and a queued job stay; Celery beat sends the sweep to the worker; the queued-jobs quota
and the per-key rate limit answer 429 with ``Retry-After`` and store nothing (an API app built
in-process on the stack's Redis and object store, with its own database so the stack's worker
does not take its jobs)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from devstack import HOUSEKEEPER_QUEUE, CeleryWorker
from devstack.testbed import HELD_PREFIX, HOLD_KEY, KEY_A, KEY_B, TENANT_A, Service, until
from jobcore.config import Settings
from jobcore.retention import expire_jobs
from jobcore.storage import Storage
from jobcore.store import FINISHED_KEY, JobStore, make_redis
from service.client import ApiError, LorpClient
from service.main import create_app

pytestmark = pytest.mark.integration
SWEEP_DONE = re.compile(r"Task lorp\.expire_jobs\[[^\]]+\] succeeded")
DEFERRED = re.compile(r"Task lorp\.run_job\[[^\]]+\] retry: Retry in 10s")


def _succeeded(service: Service, client: httpx.Client) -> str:
    job = client.post("/jobs", json=service.job_body()).raise_for_status().json()
    assert service.wait(client, job["id"])["state"] == "succeeded"
    return str(job["id"])


def _settings(service: Service, monkeypatch: pytest.MonkeyPatch, **extra: str) -> Settings:
    """The stack's settings (as its API and worker read them), plus ``extra`` LORP_* values."""
    for name, value in {**service.stack.env, **extra}.items():
        monkeypatch.setenv(name, value)
    return Settings()  # type: ignore[call-arg]


def test_delete_removes_objects_and_record(service: Service, client_a: httpx.Client,
                                           client_b: httpx.Client) -> None:  # fmt: skip
    job_id = _succeeded(service, client_a)
    keys = service.artifact_keys(TENANT_A, job_id)
    assert f"{TENANT_A}/jobs/{job_id}/manifest.json" in keys and len(keys) > 2

    other = client_b.delete(f"/jobs/{job_id}")  # another tenant's job is a missing one
    assert other.status_code == 404 and other.json()["code"] == "not_found"
    assert service.artifact_keys(TENANT_A, job_id) == keys

    gone = client_a.delete(f"/jobs/{job_id}")
    assert gone.status_code == 204 and gone.content == b""
    assert service.artifact_keys(TENANT_A, job_id) == []
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/artifacts", f"/jobs/{job_id}/report"):
        assert client_a.get(path).status_code == 404, path
    listed = client_a.get("/jobs", params={"limit": 100}).json()["items"]
    assert job_id not in {j["id"] for j in listed}
    db = service.redis()
    assert not db.exists(f"lorp:job:{job_id}") and db.zscore(FINISHED_KEY, job_id) is None
    again = client_a.delete(f"/jobs/{job_id}")  # the second DELETE: gone either way
    assert again.status_code == 404 and again.json()["code"] == "not_found"
    with LorpClient(service.url, KEY_A) as api, pytest.raises(ApiError) as err:
        api.delete(job_id)
    assert (err.value.status_code, err.value.code) == (404, "not_found")


def test_expiry_removes_only_expired_finished_jobs(
    service: Service, client_a: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = _succeeded(service, client_a)
    settings = _settings(service, monkeypatch)
    store = JobStore(make_redis(settings.redis_url))
    db = service.redis()
    db.set(HOLD_KEY, "calibration")
    running = queued = ""
    try:
        running = client_a.post("/jobs", json=service.job_body()).raise_for_status().json()["id"]
        until("the job held running", lambda: db.get(HELD_PREFIX + running), timeout=120)
        queued = client_a.post("/jobs", json=service.job_body()).raise_for_status().json()["id"]
        for job_id in (running, queued):  # never deleted while queued or running
            refused = client_a.delete(f"/jobs/{job_id}")
            assert refused.status_code == 409 and "cancel it first" in refused.json()["detail"]
        finished = db.zscore(FINISHED_KEY, done)
        assert finished is not None
        # a sweep at a time when `done` is a second past its retention
        result = expire_jobs(store, Storage(settings), 1, now=finished + 1.5)
        assert done in result.deleted and not result.failed
        assert running not in result.deleted and queued not in result.deleted
        assert service.artifact_keys(TENANT_A, done) == []
        assert client_a.get(f"/jobs/{done}").status_code == 404
        assert client_a.get(f"/jobs/{running}").json()["state"] == "running"
        assert client_a.get(f"/jobs/{queued}").json()["state"] == "queued"
        # a sweep far in the future still leaves them alone
        expire_jobs(store, Storage(settings), 1, now=time.time() + 10 * 24 * 3600)
        assert client_a.get(f"/jobs/{running}").json()["state"] == "running"
        assert client_a.get(f"/jobs/{queued}").json()["state"] == "queued"
    finally:
        for job_id in (queued, running):
            if job_id:
                client_a.post(f"/jobs/{job_id}/cancel")
        db.delete(HOLD_KEY)
        store.close()
    for job_id in (running, queued):
        assert service.wait(client_a, job_id)["state"] == "cancelled"


def test_the_housekeepers_beat_runs_the_expiry_sweep(service: Service) -> None:
    """A housekeeper with a 1 s sweep period: its beat sends ``expire_jobs`` and a housekeeper
    (it, or the stack's own: they share the queue) runs it, off the job queue."""
    stack = service.stack
    extra = CeleryWorker(
        {**stack.env, "LORP_RETENTION_SWEEP_SECONDS": "1"},
        log_path=stack.log_dir / "housekeeper-beat-test.log",
        queues=[HOUSEKEEPER_QUEUE],
        app="worker.housekeeper",
        extra_args=["--beat", "--schedule", str(stack.root / "beat-test-schedule")],
    )
    logs = [extra]
    if stack.housekeeper is not None:
        logs.append(stack.housekeeper)
    with extra:
        until(
            "a housekeeper to run an expiry sweep",
            lambda: any(SWEEP_DONE.search(h.log_text()) for h in logs),
            timeout=90,
            step=0.5,
        )
    assert "Sending due task expire-jobs (lorp.expire_jobs)" in extra.log_text()
    assert not SWEEP_DONE.search(stack.workers[0].log_text())  # never on the job queue


def test_running_limit_defers_and_lets_other_tenants_run(
    service: Service, client_a: httpx.Client, client_b: httpx.Client
) -> None:
    """Two workers; tenant A at its running limit (1, on the second worker's settings): A's
    second job waits queued (deferred, never started) while tenant B's job runs on the free
    worker, and runs once A's first job is done."""
    db = service.redis()
    db.set(HOLD_KEY, "calibration")  # the stack's worker parks A's first job there
    limited = CeleryWorker(
        {**service.stack.env, **service.stack.worker_env, "LORP_TENANT_MAX_RUNNING": "1"},
        log_path=service.stack.log_dir / "worker-limited.log",
        hostname="lorp-limited@localhost",
    )
    a1 = a2 = ""
    try:
        a1 = client_a.post("/jobs", json=service.job_body()).raise_for_status().json()["id"]
        until("A's first job held running", lambda: db.get(HELD_PREFIX + a1), timeout=120)
        limited.start()  # plain worker.celery_app: no hold point
        a2 = client_a.post("/jobs", json=service.job_body()).raise_for_status().json()["id"]
        until("A's second job deferred", lambda: DEFERRED.search(limited.log_text()), 120, 0.2)
        body_b = service.job_body(
            model=str(service.model_local), calibration="corpus:handbook", evaluation=None
        )
        b1 = client_b.post("/jobs", json=body_b).raise_for_status().json()["id"]
        assert service.wait(client_b, b1)["state"] == "succeeded"  # B is not held up by A
        waiting = client_a.get(f"/jobs/{a2}").json()
        assert waiting["state"] == "queued" and waiting["started_at"] is None
        assert client_a.get(f"/jobs/{a1}").json()["state"] == "running"
        db.delete(HOLD_KEY)
        assert service.wait(client_a, a1)["state"] == "succeeded"
        done = service.wait(client_a, a2, timeout=180)
        assert done["state"] == "succeeded" and done["attempts"] == 1
    finally:
        db.delete(HOLD_KEY)
        for job_id in (a1, a2):
            if job_id:
                client_a.post(f"/jobs/{job_id}/cancel")
        limited.stop()


@pytest.fixture
def limited(service: Service, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API in-process with quotas on, on database 5 of the stack's Redis (its jobs are
    queued there; no worker consumes that database)."""
    url = service.stack.redis.url.rsplit("/", 1)[0] + "/5"
    settings = _settings(
        service,
        monkeypatch,
        LORP_REDIS_URL=url,
        LORP_BROKER_URL=url,
        LORP_TENANT_MAX_QUEUED="1",
        LORP_RATE_LIMIT_PER_SECOND="0.5",
        LORP_RATE_LIMIT_BURST="4",
    )
    with TestClient(create_app(settings)) as client:
        make_redis(url).flushdb()
        yield client
        make_redis(url).flushdb()


def test_queued_quota_and_rate_limit_answer_429(service: Service, limited: TestClient) -> None:
    db = make_redis(service.stack.redis.url.rsplit("/", 1)[0] + "/5")
    body = service.job_body()
    first = limited.post("/jobs", json=body, headers={"X-API-Key": KEY_A})
    assert first.status_code == 202
    keys = sorted(db.scan_iter("*"))
    over = limited.post("/jobs", json=body, headers={"X-API-Key": KEY_A})
    assert over.status_code == 429
    assert over.json()["code"] == "quota_exceeded"
    assert "tenant_max_queued=1" in over.json()["detail"]
    assert int(over.headers["Retry-After"]) > 0
    # nothing stored for the refused job (the rate limit's bucket aside)
    assert sorted(k for k in db.scan_iter("*") if not k.startswith("lorp:rate:")) == [
        k for k in keys if not k.startswith("lorp:rate:")
    ]
    body_b = service.job_body(
        model=str(service.model_local), calibration="corpus:handbook", evaluation=None
    )  # tenant B may not read A's inputs
    assert limited.post("/jobs", json=body_b, headers={"X-API-Key": KEY_B}).status_code == 202
    # burst 4 per key: two requests of KEY_A above, two more pass, then 429
    for _ in range(2):
        assert limited.get("/jobs", headers={"X-API-Key": KEY_A}).status_code == 200
    limited_resp = limited.get("/jobs", headers={"X-API-Key": KEY_A})
    assert limited_resp.status_code == 429 and limited_resp.json()["code"] == "rate_limited"
    assert "rate_limit_per_second=0.5" in limited_resp.json()["detail"]
    assert 1 <= int(limited_resp.headers["Retry-After"]) <= 2
    assert limited.get("/jobs", headers={"X-API-Key": KEY_B}).status_code == 200  # own bucket
    assert limited.get("/healthz").status_code == 200  # no key, no limit
