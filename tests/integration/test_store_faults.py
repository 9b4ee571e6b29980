"""The object store slow and flapping while a job uploads (issue 24): the workers reach
SeaweedFS through ``devstack.faults.FaultProxy``; with added latency and the connection reset
twice mid-upload, the job retries and succeeds, or fails cleanly with ``storage_unavailable``;
either way the manifest (the commit point) is never written before every object it lists."""

from __future__ import annotations

import json

import httpx
import pytest

from devstack.testbed import HELD_PREFIX, HOLD_KEY, SMALL_BENCH, until
from tests.integration.conftest import ARTIFACT_BUCKET, TENANT_A, Service

pytestmark = pytest.mark.integration


def test_slow_flapping_store_during_upload(service: Service, client_a: httpx.Client) -> None:
    proxy = service.s3_proxy
    assert proxy is not None
    redis = service.redis()
    redis.set(HOLD_KEY, "uploading#2", ex=600)  # park after the first object is uploaded
    try:
        job_id = client_a.post("/jobs", json=service.job_body(benchmark=SMALL_BENCH)).json()["id"]
        until("job held", lambda: redis.get(HELD_PREFIX + job_id) == "uploading")
        refused_before = proxy.refused
        proxy.delay_s = 0.02
        flapping = proxy.flap([(True, 1.5), (False, 0.5), (True, 1.5)])
        redis.delete(HOLD_KEY)
        job = service.wait(client_a, job_id, timeout=180)
        flapping.join()
    finally:
        proxy.delay_s = 0.0
        proxy.set_down(False)
        redis.delete(HOLD_KEY)
        redis.close()
    print(f"{job['state']}; connections reset by the proxy: {proxy.refused - refused_before}")
    prefix = f"{TENANT_A}/jobs/{job_id}/"
    s3 = service.s3()
    objects = {
        o["Key"][len(prefix) :]: o["Size"]
        for o in s3.list_objects_v2(Bucket=ARTIFACT_BUCKET, Prefix=prefix).get("Contents", [])
    }
    if job["state"] == "succeeded":
        manifest = json.loads(
            s3.get_object(Bucket=ARTIFACT_BUCKET, Key=prefix + "manifest.json")["Body"].read()
        )
        listed = {f["name"]: f["size"] for f in manifest["files"]}
        assert {k: v for k, v in objects.items() if k != "manifest.json"} == listed
    else:
        assert job["state"] == "failed", job
        assert job["error"]["code"] == "storage_unavailable", job["error"]
        assert "manifest.json" not in objects
    # the worker is fine afterwards
    again = client_a.post("/jobs", json=service.job_body()).json()["id"]
    assert service.wait(client_a, again)["state"] == "succeeded"
