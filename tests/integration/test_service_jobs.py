"""End to end through REST on the real stack: submit -> poll -> succeeded -> download."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.integration.conftest import ARTIFACT_BUCKET, TENANT_A, Service

pytestmark = pytest.mark.integration

EXPECTED_FILES = {
    "model/model.safetensors",
    "model/config.json",
    "report.json",
    "report.html",
    "heatmap.png",
    "similarity.npy",
    "manifest.json",
}


def test_submit_poll_download(service: Service, client_a: httpx.Client, tmp_path: Path) -> None:
    body = service.job_body(
        benchmark={
            "prefill": [[1, 16]],
            "decode": [[1, 4, 4]],
            "warmup": 0,
            "repetitions": 10,
            "measure_blocks": False,
            # the default (25% of the tiny job's other stages, well under a second) may skip
            # the decode row; this test wants both measured
            "budget_s": 60,
        }
    )
    resp = client_a.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["state"] == "queued" and job["spec"]["budget"]["blocks"] == 2

    stages: set[str] = set()

    def done(j: dict) -> bool:
        if j["progress"]["stage"]:
            stages.add(j["progress"]["stage"])
        return j["state"] in {"succeeded", "failed", "cancelled"}

    job = service.wait(client_a, job["id"], until=done)
    assert job["state"] == "succeeded", job
    assert job["error"] is None and job["attempts"] == 1
    assert job["started_at"] <= job["finished_at"]
    assert stages & {"downloading", "loading", "calibration", "uploading", "done"}
    summary = job["summary"]
    assert summary["num_layers"] == 6 and summary["kept_layers"] == 4
    assert len(summary["removed_blocks"]) == 2
    assert summary["perplexity_before"] > 0 and summary["perplexity_after"] > 0
    assert summary["prefill_speedup"] is not None and summary["prefill_speedup"] > 0
    assert summary["decode_speedup"] is not None and summary["decode_speedup"] > 0

    # Artifacts: manifest entries with presigned URLs that work without the API key.
    arts = client_a.get(f"/jobs/{job['id']}/artifacts")
    assert arts.status_code == 200, arts.text
    items = {a["name"]: a for a in arts.json()["items"]}
    assert set(items) >= EXPECTED_FILES
    out = tmp_path / "download"
    for name, art in items.items():
        data = httpx.get(art["url"], timeout=30).raise_for_status().content
        assert len(data) == art["size"], name
        assert hashlib.sha256(data).hexdigest() == art["sha256"], name
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)

    # The manifest lists every other object under the job prefix, nothing more.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job_id"] == job["id"]
    listed = {f["name"] for f in manifest["files"]}
    keys = service.artifact_keys(TENANT_A, job["id"])
    prefix = f"{TENANT_A}/jobs/{job['id']}/"
    assert {k[len(prefix) :] for k in keys} == listed | {"manifest.json"}

    # /report serves the same report.json.
    report = client_a.get(f"/jobs/{job['id']}/report").raise_for_status().json()
    assert report == json.loads((out / "report.json").read_text())
    assert report["summary"]["removed"] == summary["removed_blocks"]

    # The pruned checkpoint loads with plain transformers and has the kept depth.
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 4
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()

    # Presigned URLs are scoped to the artifact bucket and the tenant's prefix.
    assert all(f"/{ARTIFACT_BUCKET}/{prefix}" in a["url"] for a in items.values())


def test_local_model_corpus_and_fraction(service: Service, client_a: httpx.Client) -> None:
    body = {
        "model": str(service.model_local),
        "calibration": "corpus:handbook",
        "method": "shortgpt",
        "budget": {"fraction": 0.34},
        "windows": 4,
        "seq_len": 32,
    }
    resp = client_a.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job = service.wait(client_a, resp.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["summary"]["method"] == "shortgpt"
    assert len(job["summary"]["removed_blocks"]) == 2  # round(0.34 * 6)


def test_worker_failure_is_reported_with_code(service: Service, client_a: httpx.Client) -> None:
    # Valid request, but the S3 prefix holds no model: the job fails cleanly with a code.
    body = service.job_body(model="s3://lorp-inputs/alpha/models/does-not-exist")
    job = service.wait(client_a, client_a.post("/jobs", json=body).json()["id"])
    assert job["state"] == "failed"
    assert job["error"]["code"] == "input_not_found"
    assert "Traceback" not in job["error"]["message"]
    assert service.artifact_keys(TENANT_A, job["id"]) == []
    assert client_a.get(f"/jobs/{job['id']}/artifacts").status_code == 409
    # Too many blocks for the model (depth only known to the worker for S3 models).
    job = service.wait(
        client_a, client_a.post("/jobs", json=service.job_body(budget={"blocks": 6})).json()["id"]
    )
    assert job["state"] == "failed"
    assert job["error"]["code"] == "invalid_budget", job["error"]
