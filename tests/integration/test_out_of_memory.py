"""Running out of memory in a job, through the real stack (issue 20): the job ends ``failed``
with ``model_too_large`` and a message naming the stage and ``offload: "sequential"``, in one
attempt (no redelivery loop), nothing is uploaded, and the same worker takes the next job."""

from __future__ import annotations

import httpx
import pytest

from devstack.testbed import OOM_KEY
from tests.integration.conftest import TENANT_A, Service

pytestmark = pytest.mark.integration


def test_out_of_memory_fails_the_job_cleanly_and_the_worker_goes_on(
    service: Service, client_a: httpx.Client
) -> None:
    redis = service.redis()
    redis.set(OOM_KEY, "calibration", ex=300)
    try:
        job_id = client_a.post("/jobs", json=service.job_body()).raise_for_status().json()["id"]
        job = service.wait(client_a, job_id, timeout=180)
    finally:
        redis.delete(OOM_KEY)
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "model_too_large"
    message = job["error"]["message"]
    assert "out of device memory during the calibration stage" in message
    assert 'offload: "sequential"' in message
    assert job["attempts"] == 1
    assert service.artifact_keys(TENANT_A, job_id) == []
    worker = service.stack.workers[0]
    assert worker.alive()
    after = client_a.post("/jobs", json=service.job_body()).raise_for_status().json()["id"]
    assert service.wait(client_a, after, timeout=180)["state"] == "succeeded"
