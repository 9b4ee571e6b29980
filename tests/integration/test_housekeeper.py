"""The housekeeper's orphan sweep on the real stack (issue 24): one of two workers is SIGKILLed
whole (main process and pool) while it runs a job; the job's run lock expires, the housekeeper
re-sends it, and the other worker finishes it — once, without the dead worker coming back and
without waiting for the broker's visibility timeout (six hours)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from devstack.testbed import HELD_PREFIX, HOLD_KEY, SMALL_BENCH, until
from tests.integration.conftest import ARTIFACT_BUCKET, TENANT_A, Service

pytestmark = pytest.mark.integration


def test_a_dead_workers_job_finishes_on_the_other_worker(
    service: Service, client_a: httpx.Client
) -> None:
    stack = service.stack
    first = stack.workers[0]
    body = service.job_body(benchmark=SMALL_BENCH)
    redis = service.redis()
    redis.set(HOLD_KEY, "benchmark", ex=600)  # park the job in the first worker
    try:
        job_id = client_a.post("/jobs", json=body).json()["id"]
        until("job held", lambda: redis.get(HELD_PREFIX + job_id) == "benchmark")
        second = stack.add_worker()  # started after the job: the first worker runs it
        first.kill()  # main process and pool together: its message stays unacked
        killed = time.monotonic()
    finally:
        redis.delete(HOLD_KEY)
        redis.close()
    try:
        job = service.wait(client_a, job_id, until=lambda j: j["attempts"] == 2, timeout=90)
        resumed = time.monotonic() - killed
        job = service.wait(client_a, job_id, timeout=180)
        print(f"re-sent and started on the other worker {resumed:.1f} s after the SIGKILL")
        # lock TTL (10 s) + the sweep's period (15 s) + the message's trip, with slack
        assert resumed < 60
        assert job["state"] == "succeeded" and job["attempts"] == 2
        prefix = f"{TENANT_A}/jobs/{job_id}/"
        manifest = json.loads(
            service.s3()
            .get_object(Bucket=ARTIFACT_BUCKET, Key=prefix + "manifest.json")["Body"]
            .read()
        )
        names = {f["name"] for f in manifest["files"]}
        assert {k[len(prefix) :] for k in service.artifact_keys(TENANT_A, job_id)} == names | {
            "manifest.json"
        }
        assert second.alive()
        assert f"{job_id}" in second.log_text()  # the survivor ran it
    finally:
        first.start()
        second.stop()
        stack.workers.remove(second)
