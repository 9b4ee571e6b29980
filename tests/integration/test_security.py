"""Issue 18 (security) on the real stack.

A tenant reads inputs only from locations granted to it: two tenants (alpha owns the inputs,
beta attacks with a valid key of its own) and two buckets (the input bucket ``lorp-inputs`` and
the service bucket ``lorp-artifacts``). Job errors and reports name the inputs as submitted,
never the worker's file system.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from jobcore.config import Settings
from jobcore.spec import JobCreate
from jobcore.store import JobStore
from service.queue import JobQueue
from tests.integration.conftest import (
    ARTIFACT_BUCKET,
    INPUT_BUCKET,
    KEY_B,
    TENANT_A,
    TENANT_B,
    Service,
)

pytestmark = pytest.mark.integration

GRANTED_TO_B = f"s3://{ARTIFACT_BUCKET}/{TENANT_B}/, s3://{INPUT_BUCKET}/{TENANT_B}/"
REFUSAL = (
    f"Value error, s3:// inputs must be inside a location granted to your tenant ({GRANTED_TO_B})"
)


def _job_ids(client: httpx.Client) -> set[str]:
    page = client.get("/jobs", params={"limit": 100}).raise_for_status().json()
    return {job["id"] for job in page["items"]}


def _errors(resp: httpx.Response) -> list[tuple[tuple[str, ...], str]]:
    assert resp.status_code == 422, resp.text
    return sorted((tuple(e["loc"]), e["msg"]) for e in resp.json()["detail"])


def test_other_tenants_inputs_are_refused_at_submit(
    service: Service, client_b: httpx.Client
) -> None:
    """The probe's request: beta names alpha's model and calibration text in the input bucket.
    It gets 422 on both fields and no job is stored."""
    before = _job_ids(client_b)
    body: dict[str, Any] = {
        "model": f"s3://{INPUT_BUCKET}/{TENANT_A}/models/tiny-llama",
        "calibration": f"s3://{INPUT_BUCKET}/{TENANT_A}/texts/calibration.txt",
        "budget": {"blocks": 2},
    }
    # the objects exist: alpha can use them
    assert service.s3().head_object(Bucket=INPUT_BUCKET, Key=f"{TENANT_A}/texts/calibration.txt")[
        "ContentLength"
    ]
    resp = client_b.post("/jobs", json=body)
    assert _errors(resp) == [(("body", "calibration"), REFUSAL), (("body", "model"), REFUSAL)]
    resp = client_b.post("/jobs", json={**body, "evaluation": body["calibration"]})
    assert (("body", "evaluation"), REFUSAL) in _errors(resp)
    assert _job_ids(client_b) == before


def test_no_existence_oracle(service: Service, client_b: httpx.Client) -> None:
    """Whether the bucket or the prefix exists changes nothing in the answer."""
    s3 = service.s3()
    s3.put_object(Bucket=INPUT_BUCKET, Key="shared-secret/notes.txt", Body=b"secret notes")
    uris = [
        "s3://no-such-bucket/m",  # no such bucket
        f"s3://{INPUT_BUCKET}/no-such-prefix/m",  # existing bucket, missing prefix
        f"s3://{INPUT_BUCKET}/shared-secret",  # existing prefix, no tenant in it
        f"s3://{INPUT_BUCKET}/{TENANT_A}/models/tiny-llama",  # another tenant's model
        f"s3://{ARTIFACT_BUCKET}/{TENANT_A}/jobs",  # another tenant's artifacts
    ]
    answers = set()
    for uri in uris:
        resp = client_b.post("/jobs", json=service.job_body(model=uri))
        answers.add((resp.status_code, tuple(_errors(resp))))
    assert answers == {
        (
            422,
            (
                (("body", "calibration"), REFUSAL),
                (("body", "evaluation"), REFUSAL),
                (("body", "model"), REFUSAL),
            ),
        )
    }


def test_worker_refuses_an_ungranted_input_before_reading(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: a job record naming another tenant's input (as if it had been stored
    under other settings) is failed by the real worker with ``input_not_allowed`` before any
    object is read, and leaves no artifacts."""
    for key, value in service.stack.env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # type: ignore[call-arg]
    # validated without the operator's context, as a record stored under other settings
    spec = JobCreate.model_validate(
        service.job_body(evaluation=None, model=f"s3://{INPUT_BUCKET}/{TENANT_A}/models/tiny-llama")
    )
    store = JobStore.from_settings(settings)
    queue = JobQueue(settings, store)
    try:
        target = settings.cpu_queue
        rec, created = store.create(TENANT_B, spec, message=queue.with_create(target), queue=target)
        assert created
    finally:
        queue.close()
        store.close()
    with service.client(KEY_B) as client:
        job = service.wait(client, rec.id, timeout=60)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "input_not_allowed"
    assert GRANTED_TO_B in job["error"]["message"]
    assert service.artifact_keys(TENANT_B, rec.id) == []


def test_errors_and_reports_name_inputs_as_submitted(
    service: Service, client_a: httpx.Client
) -> None:
    work = str(service.stack.root / "work")
    # A model whose weights file is not safetensors inside: refused before loading, the error
    # names the file by its name in the model (issue 18), never by where the worker keeps it.
    s3 = service.s3()
    prefix = f"{TENANT_A}/models/broken"
    s3.put_object(Bucket=INPUT_BUCKET, Key=f"{prefix}/config.json", Body=b'{"model_type": "llama"}')
    s3.put_object(Bucket=INPUT_BUCKET, Key=f"{prefix}/model.safetensors", Body=b"not a model")
    broken = f"s3://{INPUT_BUCKET}/{prefix}"
    job = service.wait(
        client_a, client_a.post("/jobs", json=service.job_body(model=broken)).json()["id"]
    )
    assert job["state"] == "failed" and job["error"]["code"] == "model_load_failed", job
    assert work not in job["error"]["message"] and "/inputs/" not in job["error"]["message"]
    assert job["error"]["message"].startswith("model.safetensors: "), job["error"]

    # A pruned job's report names the model, calibration and evaluation URIs.
    body = service.job_body(budget={"blocks": 1})
    job = service.wait(client_a, client_a.post("/jobs", json=body).json()["id"])
    assert job["state"] == "succeeded", job
    report = client_a.get(f"/jobs/{job['id']}/report").raise_for_status().json()
    assert report["model"]["source"] == body["model"]
    assert report["extra"]["calibration"]["source"] == body["calibration"]
    assert report["quality"]["dataset"] == body["evaluation"]
    assert work not in json.dumps(report)


def test_job_at_every_cap_is_refused_with_its_estimate(
    service: Service, client_a: httpx.Client
) -> None:
    before = _job_ids(client_a)
    body = service.job_body(
        windows=1024,
        seq_len=8192,
        batch_size=64,
        eval_windows=1024,
        benchmark={
            "prefill": [[64, 8192 - i] for i in range(8)],
            "decode": [[64, 8192 - i, 2048] for i in range(8)],
            "warmup": 20,
            "repetitions": 200,
        },
    )
    resp = client_a.post("/jobs", json=body)
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body"]
    assert "job too costly: about" in error["msg"] and "limit for your tenant is" in error["msg"]
    assert _job_ids(client_a) == before


def test_presigned_urls_are_signed_by_a_read_only_identity(
    service: Service, client_a: httpx.Client
) -> None:
    """Item 9: the access key ID in every download URL is the read-only identity's, never the
    service's read-write one, and that identity cannot write or delete."""
    seaweed = service.stack.s3
    job = service.wait(
        client_a, client_a.post("/jobs", json=service.job_body(budget={"blocks": 1})).json()["id"]
    )
    assert job["state"] == "succeeded", job
    items = client_a.get(f"/jobs/{job['id']}/artifacts").raise_for_status().json()["items"]
    url = next(a["url"] for a in items if a["name"] == "report.json")
    assert f"X-Amz-Credential={seaweed.read_access_key}" in url
    assert seaweed.access_key not in url
    assert httpx.get(url, timeout=30).raise_for_status().json()["summary"]
    reader = seaweed.client(access_key=seaweed.read_access_key, secret_key=seaweed.read_secret_key)
    key = f"{TENANT_A}/jobs/{job['id']}/report.json"
    for attempt in (
        lambda: reader.put_object(Bucket=ARTIFACT_BUCKET, Key=key, Body=b"{}"),
        lambda: reader.delete_object(Bucket=ARTIFACT_BUCKET, Key=key),
    ):
        with pytest.raises(ClientError) as info:
            attempt()
        assert info.value.response["Error"]["Code"] == "AccessDenied"
    assert service.s3().get_object(Bucket=ARTIFACT_BUCKET, Key=key)["ContentLength"] > 2
