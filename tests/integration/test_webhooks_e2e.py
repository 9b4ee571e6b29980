"""Webhooks on the real stack (issue 24 item 4): the API stores a job with ``callback_url``, the
real worker runs it, the housekeeper (``worker.housekeeper``, its own Celery worker) posts a signed
event per state change to a receiver on loopback, retries while the receiver is down or
failing, and records every attempt on the job."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack.receiver import Post, WebhookReceiver
from devstack.stack import free_port
from devstack.testbed import until
from jobcore import webhooks
from tests.integration.conftest import TENANT_A, WEBHOOK_SECRET, Service

pytestmark = pytest.mark.integration

SECRET_A = hmac.new(WEBHOOK_SECRET.encode(), TENANT_A.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def receivers() -> Iterator[list[WebhookReceiver]]:
    started: list[WebhookReceiver] = []
    yield started
    for receiver in started:
        receiver.stop()


def _until(check: Any, timeout: float = 60.0) -> None:
    until("webhook deliveries", check, timeout=timeout, step=0.2)


def _verified(post: Post) -> bool:
    return webhooks.verify(SECRET_A.encode(), post.headers[webhooks.SIGNATURE_HEADER], post.body)


STATES = ("queued", "running", "succeeded")


def test_every_state_change_is_delivered_signed_through_failures(
    service: Service, client_a: httpx.Client, receivers: list[WebhookReceiver]
) -> None:
    server = WebhookReceiver(free_port(), failures=2).start()
    receivers.append(server)
    job_id = client_a.post("/jobs", json=service.job_body(callback_url=server.url)).json()["id"]
    job = service.wait(client_a, job_id)
    assert job["state"] == "succeeded", job
    _until(lambda: set(server.delivered()) == {f"{job_id}.{s}" for s in STATES})
    events = server.delivered()
    for state in STATES:
        (first, *duplicates) = [p.json() for p in events[f"{job_id}.{state}"]]
        assert all(d == first for d in duplicates)  # a redelivery says the same
        assert first["state"] == state and first["job"]["id"] == job_id
        assert first["type"] == "job.state_changed"
    final = events[f"{job_id}.succeeded"][0].json()["job"]
    assert final["summary"]["removed_blocks"] == job["summary"]["removed_blocks"]
    assert all(_verified(p) for p in server.posts)
    assert sum(p.status == 503 for p in server.posts) == 2
    # the attempts on the job: two refusals, then one success per event
    _until(lambda: sum(d["ok"] for d in client_a.get(f"/jobs/{job_id}").json()["deliveries"]) >= 3)
    deliveries = client_a.get(f"/jobs/{job_id}").json()["deliveries"]
    assert [d["status"] for d in deliveries if not d["ok"]] == [503, 503]
    assert {d["event_id"] for d in deliveries if d["ok"]} == {f"{job_id}.{s}" for s in STATES}
    assert all(d["attempt"] >= 1 and d["seconds"] is not None for d in deliveries)


def test_a_receiver_that_is_down_gets_every_event_once_it_is_up(
    service: Service, client_a: httpx.Client, receivers: list[WebhookReceiver]
) -> None:
    server = WebhookReceiver(free_port())  # not listening yet
    receivers.append(server)
    job_id = client_a.post("/jobs", json=service.job_body(callback_url=server.url)).json()["id"]
    assert service.wait(client_a, job_id)["state"] == "succeeded"
    _until(lambda: len(client_a.get(f"/jobs/{job_id}").json()["deliveries"]) >= 3)
    down = client_a.get(f"/jobs/{job_id}").json()["deliveries"]
    assert not any(d["ok"] for d in down)
    assert all(d["status"] is None and "Connection" in d["error"] for d in down)
    server.start()
    _until(lambda: set(server.delivered()) == {f"{job_id}.{s}" for s in STATES})
    assert all(_verified(p) for p in server.posts)


def test_a_forbidden_callback_is_refused_and_nothing_is_stored(
    service: Service, client_a: httpx.Client
) -> None:
    before = client_a.get("/jobs", params={"limit": 100}).json()["items"]
    for url, reason in [
        ("http://169.254.169.254/latest/meta-data", "not among the hosts"),
        ("http://localhost:8080/x", "not among the hosts"),
        ("gopher://127.0.0.1/x", "must use https or http"),
        ("http://user@127.0.0.1/x", "user info"),
    ]:
        resp = client_a.post("/jobs", json=service.job_body(callback_url=url))
        assert resp.status_code == 422, resp.text
        (error,) = resp.json()["detail"]
        assert error["loc"] == ["body", "callback_url"]
        assert reason in error["msg"]
    assert client_a.get("/jobs", params={"limit": 100}).json()["items"] == before
