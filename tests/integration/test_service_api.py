"""API behaviour on the real stack: auth, validation, idempotency, tenants, cancel, listing,
health, fault answers. Jobs that should not run are created while the worker is stopped."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack.hostile import BAD_REQUESTS, Bad, make_hostile_files
from tests.integration.conftest import KEY_A, Service

pytestmark = pytest.mark.integration


def test_health_ready_metrics(service: Service) -> None:
    with service.client(None) as c:
        assert c.get("/healthz").json() == {"status": "ok", "checks": {}}
        ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "checks": {"redis": True, "s3": True}}
        metrics = c.get("/metrics")
        assert metrics.status_code == 200
        assert "lorp_http_requests_total" in metrics.text
        assert 'route="/readyz"' in metrics.text
        assert "lorp_queue_length" in metrics.text
        spec = c.get("/openapi.json").json()
        assert {
            "/jobs",
            "/jobs/{job_id}",
            "/jobs/{job_id}/cancel",
            "/jobs/{job_id}/report",
            "/jobs/{job_id}/artifacts",
            "/healthz",
            "/readyz",
            "/metrics",
        } <= set(spec["paths"])
        post = spec["paths"]["/jobs"]["post"]
        assert post["requestBody"]["content"]["application/json"]["examples"]


@pytest.mark.parametrize("path", ["/jobs", "/jobs/0123456789abcdef0123456789abcdef"])
@pytest.mark.parametrize("key", [None, "", "wrong-key-0000000", KEY_A + "x"])
def test_unauthenticated_is_401(service: Service, path: str, key: str | None) -> None:
    with service.client(None) as c:
        headers = {} if key is None else {"X-API-Key": key}
        resp = c.get(path, headers=headers)
        assert resp.status_code == 401
        assert resp.json()["code"] == "unauthorized" and "API key" in resp.json()["detail"]
        assert resp.headers["WWW-Authenticate"] == "ApiKey"
        assert c.post("/jobs", json=service.job_body(), headers=headers).status_code == 401


def _bad_ids() -> list[str]:
    return [b.name for b in BAD_REQUESTS]


@pytest.fixture(scope="module")
def hostile_files(service: Service) -> Iterator[None]:
    make_hostile_files(service.local_root)
    yield


def test_bad_request_table_is_big_enough() -> None:
    assert len(BAD_REQUESTS) >= 40 and len(set(_bad_ids())) == len(BAD_REQUESTS)


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=_bad_ids())
def test_bad_request_is_4xx_with_message(
    service: Service, client_a: httpx.Client, hostile_files: None, bad: Bad
) -> None:
    newest = client_a.get("/jobs", params={"limit": 1}).json()["items"]
    headers: dict[str, str | bytes] = {"Content-Type": "application/json", **bad.headers}
    content: Any
    if bad.raw is not None:
        content = bad.raw() if callable(bad.raw) else bad.raw
    else:
        assert bad.body is not None
        # ASCII-escaped JSON, so lone surrogates travel as \ud800 escapes
        content = json.dumps(bad.body(service)).encode()
    request = client_a.build_request("POST", "/jobs", content=content, headers=headers)
    if bad.drop_key:
        del request.headers["X-API-Key"]
    resp = client_a.send(request)
    assert resp.status_code in bad.status, (resp.status_code, resp.text[:500])
    payload = resp.json()
    if resp.status_code == 422:
        errors = payload["detail"]
        assert errors and all(e["msg"] and e["type"] for e in errors), errors
        if bad.loc is not None:
            assert any(tuple(e["loc"][: len(bad.loc)]) == bad.loc for e in errors), errors
    else:
        assert isinstance(payload["detail"], str) and len(payload["detail"]) > 5, payload
        assert payload["code"], payload
    # Nothing was stored.
    assert client_a.get("/jobs", params={"limit": 1}).json()["items"] == newest


def test_idempotency_keys(service: Service, client_a: httpx.Client, client_b: httpx.Client) -> None:
    key = f"idem-{uuid.uuid4()}"
    # local inputs: every tenant may read them (s3:// inputs are granted per tenant)
    body = service.job_body(
        model=str(service.model_local),
        calibration="corpus:handbook",
        evaluation=None,
        budget={"blocks": 1},
        windows=2,
    )
    first = client_a.post("/jobs", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    again = client_a.post("/jobs", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    other = client_a.post(
        "/jobs", json={**body, "budget": {"blocks": 2}}, headers={"Idempotency-Key": key}
    )
    assert other.status_code == 409
    assert other.json()["code"] == "idempotency_conflict"
    # Keys are per tenant: the same key and body from tenant B make B's own job.
    b_job = client_b.post("/jobs", json=body, headers={"Idempotency-Key": key})
    assert b_job.status_code == 202 and b_job.json()["id"] != first.json()["id"], b_job.text
    # A new key is a new job.
    fresh = client_a.post("/jobs", json=body, headers={"Idempotency-Key": key + "-2"})
    assert fresh.json()["id"] != first.json()["id"]
    for c, job_id in (
        (client_a, first.json()["id"]),
        (client_b, b_job.json()["id"]),
        (client_a, fresh.json()["id"]),
    ):
        assert service.wait(c, job_id)["state"] == "succeeded"


def test_tenant_isolation(service: Service, client_a: httpx.Client, client_b: httpx.Client) -> None:
    resp = client_a.post("/jobs", json=service.job_body(budget={"blocks": 1}, windows=2))
    job_id = resp.json()["id"]
    job = service.wait(client_a, job_id)
    assert job["state"] == "succeeded"
    assert client_a.get(f"/jobs/{job_id}/artifacts").status_code == 200
    for method, path in (
        ("GET", f"/jobs/{job_id}"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("GET", f"/jobs/{job_id}/report"),
        ("GET", f"/jobs/{job_id}/artifacts"),
    ):
        resp = client_b.request(method, path)
        assert resp.status_code == 404, (path, resp.text)
        assert resp.json()["code"] == "not_found"
    ids_b = {j["id"] for j in client_b.get("/jobs", params={"limit": 100}).json()["items"]}
    assert job_id not in ids_b
    # Tenant B can't point a job at tenant A's artifacts in the service bucket either.
    stolen = service.job_body(model=f"s3://lorp-artifacts/alpha/jobs/{job_id}/model")
    assert client_b.post("/jobs", json=stolen).status_code == 422


@pytest.fixture
def worker_paused(service: Service) -> Iterator[None]:
    """The stack's worker is stopped for the test (jobs stay queued) and restarted after."""
    worker = service.stack.workers[0]
    worker.stop()
    try:
        yield
    finally:
        if not worker.alive():
            worker.start()


def test_cancel_queued_and_listing(
    service: Service, worker_paused: None, client_a: httpx.Client
) -> None:
    # A fresh tenant key is not configurable at runtime, so count only this test's jobs.
    ids = []
    for i in range(5):
        resp = client_a.post("/jobs", json=service.job_body(windows=1 + i))
        assert resp.status_code == 202
        ids.append(resp.json()["id"])
    cancelled = client_a.post(f"/jobs/{ids[1]}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["cancel_requested"]
    assert client_a.post(f"/jobs/{ids[3]}/cancel").json()["state"] == "cancelled"
    # Cancelling again is a no-op.
    assert client_a.post(f"/jobs/{ids[3]}/cancel").json()["state"] == "cancelled"

    # Pages of 2, newest first, with a cursor; the five jobs are the newest ones.
    seen: list[str] = []
    cursor = None
    while len(seen) < 5:
        params: dict = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client_a.get("/jobs", params=params).json()
        assert 1 <= len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        assert cursor is not None or len(seen) >= 5
    assert seen[:5] == ids[::-1]
    assert len(set(seen)) == len(seen)

    by_state = {
        s: [
            j["id"]
            for j in client_a.get("/jobs", params={"state": s, "limit": 100}).json()["items"]
        ]
        for s in ("queued", "cancelled")
    }
    assert by_state["queued"][:3] == [ids[4], ids[2], ids[0]]
    assert set(by_state["queued"]).isdisjoint(by_state["cancelled"])
    assert by_state["cancelled"][:2] == [ids[3], ids[1]]
    assert client_a.get("/jobs", params={"state": "bogus"}).status_code == 422
    assert client_a.get("/jobs", params={"cursor": "abc"}).status_code == 422
    assert client_a.get("/jobs", params={"limit": 0}).status_code == 422

    # Leave nothing for the worker to run except one job, which proves the worker skips the
    # cancelled messages and is free for the next job.
    for job_id in (ids[0], ids[2]):
        assert client_a.post(f"/jobs/{job_id}/cancel").json()["state"] == "cancelled"
    service.stack.workers[0].start()
    job = service.wait(client_a, ids[4])
    assert job["state"] == "succeeded"
    for job_id in ids[:4]:
        j = client_a.get(f"/jobs/{job_id}").json()
        assert j["state"] == "cancelled" and j["attempts"] == 0
        assert service.artifact_keys("alpha", job_id) == []
    # Finished jobs can't be cancelled.
    conflict = client_a.post(f"/jobs/{ids[4]}/cancel")
    assert conflict.status_code == 409 and conflict.json()["code"] == "invalid_state"


def test_cancel_running_job_leaves_no_artifacts(service: Service, client_a: httpx.Client) -> None:
    body = service.job_body(
        benchmark={"prefill": [[4, 64]], "decode": [[1, 8, 200]], "warmup": 2, "repetitions": 100}
    )
    job_id = client_a.post("/jobs", json=body).json()["id"]
    service.wait(client_a, job_id, until=lambda j: j["progress"]["stage"] == "benchmark")
    resp = client_a.post(f"/jobs/{job_id}/cancel")
    assert resp.status_code == 200 and resp.json()["cancel_requested"]
    start = time.monotonic()
    job = service.wait(client_a, job_id, timeout=60)
    assert job["state"] == "cancelled", job
    assert time.monotonic() - start < 30
    assert service.artifact_keys("alpha", job_id) == []


def test_redis_down_is_503_then_recovers(service: Service, client_a: httpx.Client) -> None:
    redis = service.stack.redis
    redis.stop()
    try:
        for method, path in (("GET", "/jobs"), ("GET", f"/jobs/{'0' * 32}")):
            start = time.monotonic()
            resp = client_a.request(method, path)
            assert time.monotonic() - start < 2.0
            assert resp.status_code == 503, resp.text
            assert resp.headers["Retry-After"]
            assert resp.json()["code"] == "store_unavailable"
        resp = client_a.post("/jobs", json=service.job_body())
        assert resp.status_code == 503 and resp.headers["Retry-After"]
        ready = client_a.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] is False
    finally:
        redis.start()
    deadline = time.monotonic() + 30
    while client_a.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "API did not recover"
        time.sleep(0.2)
    job = service.wait(client_a, client_a.post("/jobs", json=service.job_body()).json()["id"])
    assert job["state"] == "succeeded"
