"""Routing by device class through the real stack (issue 24 item 1): the session's worker runs
with ``-Q cpu`` and advertises its memory; a ``device: cpu`` job runs on it; a ``cuda`` job goes
to the GPU pool's queue; a model bigger than every pool its device allows is refused at
submission with 422 ``model_too_large`` naming the sizes, and nothing is stored."""

from __future__ import annotations

import json

import httpx
import pytest

from devstack.testbed import MAX_MODEL_BYTES, until
from jobcore.store import POOL_PREFIX
from tests.integration.conftest import Service

pytestmark = pytest.mark.integration


def test_jobs_reach_their_device_class_queue(service: Service, client_a: httpx.Client) -> None:
    redis = service.redis()
    worker = service.stack.workers[0]
    assert worker.queues == ["cpu"]
    # the -Q cpu worker advertises what it can hold: here max_model_bytes, below its RAM
    until("the worker's advertisement", lambda: redis.hget(f"{POOL_PREFIX}cpu", worker.hostname))
    offer = json.loads(redis.hget(f"{POOL_PREFIX}cpu", worker.hostname))
    assert offer["memory"] == MAX_MODEL_BYTES
    assert offer["until"] > redis.time()[0]  # refreshed while the worker lives

    job_id = client_a.post("/jobs", json=service.job_body(device="cpu")).raise_for_status()
    job_id = job_id.json()["id"]
    assert redis.hget(f"lorp:job:{job_id}", "queue") == "cpu"
    job = service.wait(client_a, job_id, timeout=180)
    assert job["state"] == "succeeded", job

    # no GPU worker: a cuda job waits on the GPU pool's queue (cancelled here)
    gpu_job = client_a.post("/jobs", json=service.job_body(device="cuda")).raise_for_status()
    gpu_id = gpu_job.json()["id"]
    try:
        assert redis.hget(f"lorp:job:{gpu_id}", "queue") == "gpu"
        assert redis.llen("gpu") == 1
    finally:
        client_a.post(f"/jobs/{gpu_id}/cancel")
        redis.delete("gpu")
    assert service.wait(client_a, gpu_id, timeout=30)["state"] == "cancelled"

    # a GPU pool that advertised less than the model's weight bytes
    offer = json.dumps({"memory": 1000, "until": redis.time()[0] + 60})
    redis.hset(f"{POOL_PREFIX}gpu", "test-gpu-worker", offer)
    try:
        before = redis.dbsize()
        refused = client_a.post("/jobs", json=service.job_body(device="cuda"))
        assert refused.status_code == 422, refused.text
        (error,) = refused.json()["detail"]
        assert error["type"] == "model_too_large" and error["loc"] == ["body", "model"]
        assert "gpu workers hold at most 1,000 bytes" in error["msg"]
        assert redis.dbsize() == before  # nothing stored
        # auto: the GPU pool is too small, the CPU pool holds it
        auto = client_a.post("/jobs", json=service.job_body()).raise_for_status().json()["id"]
        assert redis.hget(f"lorp:job:{auto}", "queue") == "cpu"
        assert service.wait(client_a, auto, timeout=180)["state"] == "succeeded"
    finally:
        redis.hdel(f"{POOL_PREFIX}gpu", "test-gpu-worker")
