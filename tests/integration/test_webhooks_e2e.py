"""Webhooks on the real stack (issue 24 item 4): the API stores a job with ``callback_url``, the
real worker runs it, the housekeeper (``worker.housekeeper``, its own Celery worker) posts a signed
event per state change to a receiver on loopback, retries while the receiver is down or
failing, and records every attempt on the job."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from devstack.stack import free_port
from jobcore import webhooks
from tests.integration.conftest import TENANT_A, WEBHOOK_SECRET, Service

pytestmark = pytest.mark.integration

SECRET_A = hmac.new(WEBHOOK_SECRET.encode(), TENANT_A.encode(), hashlib.sha256).hexdigest()


class Receiver(ThreadingHTTPServer):
    """Answers the first ``failures`` POSTs with 503, then 200; keeps every POST."""

    def __init__(self, port: int, failures: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.failures = failures
        self.seen: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    def events(self) -> dict[str, list[dict[str, Any]]]:
        """Event id -> the bodies of every POST that was answered 200 (duplicates kept)."""
        out: dict[str, list[dict[str, Any]]] = {}
        with self.lock:
            for headers, body in self.seen:
                if headers.get("X-Answered") == "200":
                    out.setdefault(headers[webhooks.EVENT_ID_HEADER], []).append(json.loads(body))
        return out


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            status = 503 if self.server.failures > 0 else 200
            self.server.failures -= 1
            headers = dict(self.headers)
            headers["X-Answered"] = str(status)
            # the receiver's own check: signed with the tenant's secret, fresh
            headers["X-Verified"] = str(
                webhooks.verify(SECRET_A.encode(), headers[webhooks.SIGNATURE_HEADER], body)
            )
            self.server.seen.append((headers, body))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _serve(port: int, failures: int = 0) -> Receiver:
    server = Receiver(port, failures)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for server in started:
        server.shutdown()
        server.server_close()


def _until(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


STATES = ("queued", "running", "succeeded")


def test_every_state_change_is_delivered_signed_through_failures(
    service: Service, client_a: httpx.Client, receivers: list[Receiver]
) -> None:
    port = free_port()
    receivers.append(_serve(port, failures=2))
    url = f"http://127.0.0.1:{port}/hooks/lorp"
    job_id = client_a.post("/jobs", json=service.job_body(callback_url=url)).json()["id"]
    job = service.wait(client_a, job_id)
    assert job["state"] == "succeeded", job
    server = receivers[0]
    _until(lambda: set(server.events()) == {f"{job_id}.{s}" for s in STATES})
    events = server.events()
    for state in STATES:
        (body, *duplicates) = events[f"{job_id}.{state}"]
        assert all(d == body for d in duplicates)  # a redelivery says the same
        assert body["state"] == state and body["job"]["id"] == job_id
        assert body["type"] == "job.state_changed"
    final = events[f"{job_id}.succeeded"][0]["job"]
    assert final["summary"]["removed_blocks"] == job["summary"]["removed_blocks"]
    with server.lock:
        assert all(h["X-Verified"] == "True" for h, _ in server.seen)
        assert sum(h["X-Answered"] == "503" for h, _ in server.seen) == 2
    # the attempts on the job: two refusals, then one success per event
    _until(lambda: sum(d["ok"] for d in client_a.get(f"/jobs/{job_id}").json()["deliveries"]) >= 3)
    deliveries = client_a.get(f"/jobs/{job_id}").json()["deliveries"]
    assert [d["status"] for d in deliveries if not d["ok"]] == [503, 503]
    assert {d["event_id"] for d in deliveries if d["ok"]} == {f"{job_id}.{s}" for s in STATES}
    assert all(d["attempt"] >= 1 and d["seconds"] is not None for d in deliveries)


def test_a_receiver_that_is_down_gets_every_event_once_it_is_up(
    service: Service, client_a: httpx.Client, receivers: list[Receiver]
) -> None:
    port = free_port()  # nothing listens yet
    url = f"http://127.0.0.1:{port}/h"
    job_id = client_a.post("/jobs", json=service.job_body(callback_url=url)).json()["id"]
    assert service.wait(client_a, job_id)["state"] == "succeeded"
    _until(lambda: len(client_a.get(f"/jobs/{job_id}").json()["deliveries"]) >= 3)
    down = client_a.get(f"/jobs/{job_id}").json()["deliveries"]
    assert not any(d["ok"] for d in down)
    assert all(d["status"] is None and "Connection" in d["error"] for d in down)
    receivers.append(_serve(port))
    _until(lambda: set(receivers[0].events()) == {f"{job_id}.{s}" for s in STATES})


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
