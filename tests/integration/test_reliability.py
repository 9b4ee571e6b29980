"""Reliability and security scenarios on the real stack (issue 6): Redis restarted mid-job,
cancel in every stage, models too large or corrupt, no remote code, tenant isolation with
expiring links, API worker processes (metrics summed over them, a killed one replaced).
Stage-specific timing uses the hold point of ``tests.integration.hold_worker`` (the worker parks
a job at a chosen progress report until it is cancelled or released)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from devstack import ApiServer
from devstack.testbed import (
    CANCEL_POINTS,
    HELD_PREFIX,
    HOLD_KEY,
    INPUT_BUCKET,
    MAX_MODEL_BYTES,
    SMALL_BENCH,
    TENANT_A,
    Service,
    until,
)
from tests.tiny_models import _COMMON, build_tiny, tiny_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture
def hold(service: Service) -> Iterator[Callable[[str], None]]:
    """``hold("stage[#n]")`` parks the next job that reaches that progress report."""
    r = service.redis()

    def set_hold(spec: str) -> None:
        r.set(HOLD_KEY, spec, ex=600)

    try:
        yield set_hold
    finally:
        r.delete(HOLD_KEY)
        r.close()


def _wait_held(service: Service, job_id: str, stage: str) -> None:
    r = service.redis()
    try:
        until(f"job {job_id} held in {stage}", lambda: r.get(HELD_PREFIX + job_id) == stage)
    finally:
        r.close()


# --------------------------------------------------------------------------------------------
# Redis restart


def test_redis_restart_mid_job_loses_nothing(
    service: Service, client_a: httpx.Client, hold: Callable[[str], None]
) -> None:
    hold("calibration")
    running = client_a.post("/jobs", json=service.job_body()).json()["id"]
    _wait_held(service, running, "calibration")
    queued = client_a.post("/jobs", json=service.job_body(budget={"blocks": 1})).json()["id"]
    assert client_a.get(f"/jobs/{running}").json()["state"] == "running"
    assert client_a.get(f"/jobs/{queued}").json()["state"] == "queued"

    redis = service.stack.redis
    redis.stop()  # SIGTERM: the AOF is flushed, like a restart by the operator
    try:
        for method, path in (
            ("GET", f"/jobs/{running}"),
            ("GET", "/jobs"),
            ("POST", "/jobs"),
            ("POST", f"/jobs/{queued}/cancel"),
        ):
            start = time.monotonic()
            kwargs: dict[str, Any] = {"json": service.job_body()} if path == "/jobs" else {}
            resp = client_a.request(method, path, **kwargs)
            elapsed = time.monotonic() - start
            assert resp.status_code == 503, (method, path, resp.status_code, resp.text)
            assert elapsed < 2.0, (method, path, elapsed)
            assert int(resp.headers["Retry-After"]) > 0
            assert resp.json()["code"] in {"store_unavailable", "queue_unavailable"}
    finally:
        redis.start()
    until("API ready again", lambda: client_a.get("/readyz").status_code == 200, timeout=30)
    service.redis().delete(HOLD_KEY)  # let the parked job go on

    first = service.wait(client_a, running, timeout=180)
    second = service.wait(client_a, queued, timeout=180)
    for job in (first, second):
        assert job["state"] == "succeeded", job
        assert job["attempts"] == 1, job  # ran exactly once: not lost, not duplicated
    ids = {j["id"] for j in client_a.get("/jobs", params={"limit": 100}).json()["items"]}
    assert {running, queued} <= ids


# --------------------------------------------------------------------------------------------
# Cancel in every stage


@pytest.mark.parametrize("point", CANCEL_POINTS)
def test_cancel_in_stage(
    service: Service, client_a: httpx.Client, hold: Callable[[str], None], point: str
) -> None:
    stage = point.partition("#")[0]
    hold(point)
    body = service.job_body(benchmark=SMALL_BENCH)
    job_id = client_a.post("/jobs", json=body).json()["id"]
    _wait_held(service, job_id, stage)
    job = client_a.get(f"/jobs/{job_id}").json()
    assert job["state"] == "running" and job["progress"]["stage"] == stage, job
    work = service.stack.root / "work" / job_id
    if stage == "downloading":
        assert (work / "inputs").is_dir()
    if stage == "uploading":
        assert service.artifact_keys(TENANT_A, job_id), "expected partial uploads while held"

    resp = client_a.post(f"/jobs/{job_id}/cancel")
    assert resp.status_code == 200 and resp.json()["cancel_requested"], resp.text
    job = service.wait(client_a, job_id, timeout=60)
    assert job["state"] == "cancelled", job
    assert job["error"] is None and job["summary"] is None
    assert service.artifact_keys(TENANT_A, job_id) == []
    assert not work.exists()
    arts = client_a.get(f"/jobs/{job_id}/artifacts")
    assert arts.status_code == 409 and arts.json()["code"] == "invalid_state"


def test_cancel_queued_behind_a_running_job(
    service: Service, client_a: httpx.Client, hold: Callable[[str], None]
) -> None:
    hold("calibration")
    first = client_a.post("/jobs", json=service.job_body()).json()["id"]
    _wait_held(service, first, "calibration")
    second = client_a.post("/jobs", json=service.job_body(budget={"blocks": 1})).json()["id"]
    resp = client_a.post(f"/jobs/{second}/cancel")
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    assert client_a.post(f"/jobs/{first}/cancel").status_code == 200
    assert service.wait(client_a, first, timeout=60)["state"] == "cancelled"
    # The worker drops the cancelled message and takes the next job.
    third = client_a.post("/jobs", json=service.job_body(budget={"blocks": 1})).json()["id"]
    service.redis().delete(HOLD_KEY)
    assert service.wait(client_a, third, timeout=120)["state"] == "succeeded"
    skipped = client_a.get(f"/jobs/{second}").json()
    assert skipped["state"] == "cancelled" and skipped["attempts"] == 0
    for job_id in (first, second):
        assert service.artifact_keys(TENANT_A, job_id) == []


# --------------------------------------------------------------------------------------------
# Too large, corrupt, unsafe


def _save_model(model: torch.nn.Module, out: Path) -> Path:
    model.save_pretrained(out)  # type: ignore[operator]
    tiny_tokenizer().save_pretrained(out)
    return out


def _upload_dir(service: Service, folder: Path, name: str) -> str:
    s3 = service.s3()
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), INPUT_BUCKET, f"{TENANT_A}/models/{name}/{path.name}")
    return f"s3://{INPUT_BUCKET}/{TENANT_A}/models/{name}"


@pytest.fixture(scope="module")
def bad_models(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Model sources (S3 URIs or local paths) that must fail cleanly, by scenario."""
    root = service.local_root / "bad-models"
    root.mkdir(exist_ok=True)
    scratch = tmp_path_factory.mktemp("bad-models")
    base = _save_model(build_tiny("llama"), scratch / "base")
    out: dict[str, str] = {}

    # ~0.92 M parameters: 3.7 MB in float32 (over the 2 MB limit), 1.8 MB stored as float16.
    torch.manual_seed(0)
    big = AutoModelForCausalLM.from_config(
        LlamaConfig(**{**_COMMON, "hidden_size": 128, "intermediate_size": 256})
    )
    big_fp32 = _save_model(big, scratch / "big-fp32")
    assert (big_fp32 / "model.safetensors").stat().st_size > MAX_MODEL_BYTES
    out["too_large_files"] = _upload_dir(service, big_fp32, "big-fp32")
    big_fp16 = _save_model(big.to(torch.float16), root / "big-fp16")
    assert (big_fp16 / "model.safetensors").stat().st_size < MAX_MODEL_BYTES
    out["too_large_in_memory"] = str(big_fp16)

    truncated = scratch / "truncated"
    shutil.copytree(base, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out["truncated_safetensors"] = _upload_dir(service, truncated, "truncated")

    wrong = root / "wrong-shapes"
    shutil.copytree(base, wrong, dirs_exist_ok=True)
    config = json.loads((wrong / "config.json").read_text())
    config["hidden_size"] = 64  # the weights are 32 wide
    (wrong / "config.json").write_text(json.dumps(config))
    out["wrong_shapes"] = str(wrong)

    bad_gguf = root / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4)
    out["bad_gguf_local"] = str(bad_gguf)
    service.s3().put_object(
        Bucket=INPUT_BUCKET, Key=f"{TENANT_A}/models/junk.gguf", Body=b"not a gguf file at all"
    )
    out["bad_gguf_s3"] = f"s3://{INPUT_BUCKET}/{TENANT_A}/models/junk.gguf"

    pickle_key = f"{TENANT_A}/models/pickle-only"
    service.s3().put_object(
        Bucket=INPUT_BUCKET, Key=f"{pickle_key}/pytorch_model.bin", Body=b"\x80\x04junk"
    )
    service.s3().upload_file(str(base / "config.json"), INPUT_BUCKET, f"{pickle_key}/config.json")
    out["pickle_weights"] = f"s3://{INPUT_BUCKET}/{pickle_key}"
    return out


# too_large_files: its weight files alone exceed what the (-Q cpu) worker pool advertised
# (MAX_MODEL_BYTES), so the API refuses it at submission (jobcore.routing), test below.
BAD_MODEL_CASES = [
    ("too_large_files", "model_too_large", "cpu workers hold at most"),
    ("too_large_in_memory", "model_too_large", "in float32"),
    ("truncated_safetensors", "model_load_failed", "safetensors"),
    ("wrong_shapes", "model_load_failed", "could not load model"),
    ("bad_gguf_local", "model_load_failed", "GGUF"),
    ("bad_gguf_s3", "model_load_failed", "GGUF"),
    ("pickle_weights", "unsafe_weights", "pickle"),
]


def test_bad_models_fail_cleanly(
    service: Service, client_a: httpx.Client, bad_models: dict[str, str]
) -> None:
    submitted = {}
    for case, _, _ in BAD_MODEL_CASES:
        # the float16 model fits as it is stored (dtype "auto", the default) but not as float32
        extra = {"dtype": "float32"} if case == "too_large_in_memory" else {}
        resp = client_a.post("/jobs", json=service.job_body(model=bad_models[case], **extra))
        if case == "too_large_files":  # refused at submission: nothing stored, no worker time
            assert resp.status_code == 422, (case, resp.text)
            (error,) = resp.json()["detail"]
            assert error["type"] == "model_too_large" and error["loc"] == ["body", "model"]
            assert f"{MAX_MODEL_BYTES:,} bytes" in error["msg"], error
            continue
        assert resp.status_code == 202, (case, resp.text)
        submitted[case] = resp.json()["id"]
    for case, code, words in BAD_MODEL_CASES:
        if case not in submitted:
            continue
        job = service.wait(client_a, submitted[case], timeout=120)
        assert job["state"] == "failed", (case, job)
        assert job["error"]["code"] == code, (case, job["error"])
        message = job["error"]["message"]
        assert words in message, (case, message)
        assert "Traceback" not in message and len(message) <= 1000
        if code == "model_too_large":
            assert str(MAX_MODEL_BYTES) in message, message
        assert service.artifact_keys(TENANT_A, job["id"]) == [], case
    # The refusals cost no worker time: nothing was loaded, so the next job runs normally.
    ok = client_a.post("/jobs", json=service.job_body(budget={"blocks": 1})).json()["id"]
    assert service.wait(client_a, ok, timeout=120)["state"] == "succeeded"
    # With dtype "auto" the float16 model is loaded as stored, which fits.
    body = service.job_body(model=bad_models["too_large_in_memory"], budget={"blocks": 1})
    auto = service.wait(client_a, client_a.post("/jobs", json=body).json()["id"], timeout=120)
    assert auto["state"] == "succeeded", auto


def test_remote_code_never_runs(service: Service, client_a: httpx.Client) -> None:
    marker_dir = service.local_root.parent / "remote-code-markers"
    marker_dir.mkdir(exist_ok=True)
    auto_map = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    jobs = {}
    # A custom architecture (needs its code) and a known one that also ships code.
    for name, model_type in (("evil-custom", "evilnet"), ("evil-llama", "llama")):
        folder = service.local_root / name
        if not folder.exists():
            _save_model(build_tiny("llama"), folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type=model_type, auto_map=auto_map)
        (folder / "config.json").write_text(json.dumps(config))
        marker = marker_dir / f"{name}.imported"
        (folder / "modeling_evil.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text('code ran')\n"
        )
        (folder / "configuration_evil.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text('code ran')\n"
        )
        resp = client_a.post("/jobs", json=service.job_body(model=str(folder)))
        assert resp.status_code == 202, resp.text
        jobs[name] = resp.json()["id"]
    custom = service.wait(client_a, jobs["evil-custom"], timeout=120)
    known = service.wait(client_a, jobs["evil-llama"], timeout=120)
    assert custom["state"] == "failed", custom
    assert custom["error"]["code"] == "model_load_failed"
    assert "custom code" in custom["error"]["message"]
    # A known architecture loads with the library's own classes, never the shipped code.
    assert known["state"] == "succeeded", known
    assert sorted(p.name for p in marker_dir.iterdir()) == []
    # The request can't turn it on either: unknown fields are refused.
    resp = client_a.post("/jobs", json={**service.job_body(), "trust_remote_code": True})
    assert resp.status_code == 422


# --------------------------------------------------------------------------------------------
# Tenants and links


@pytest.fixture
def short_ttl_api(service: Service) -> Iterator[str]:
    """A second API process on the same Redis/S3 whose presigned links live 2 seconds."""
    env = {**service.stack.env, "LORP_PRESIGN_TTL_SECONDS": "2"}
    api = ApiServer(env, log_path=service.stack.log_dir / "api-short-ttl.log")
    api.start()
    try:
        yield api.url
    finally:
        api.stop()


def test_tenant_isolation_and_link_expiry(
    service: Service, client_a: httpx.Client, client_b: httpx.Client, short_ttl_api: str
) -> None:
    job_id = client_a.post("/jobs", json=service.job_body(budget={"blocks": 1})).json()["id"]
    # While it runs (and after), tenant B sees nothing of it.
    for state in (None, "queued", "running", "succeeded"):
        params: dict[str, Any] = {"limit": 100, **({"state": state} if state else {})}
        page = client_b.get("/jobs", params=params)
        assert page.status_code == 200
        assert job_id not in {j["id"] for j in page.json()["items"]}
    cancel = client_b.post(f"/jobs/{job_id}/cancel")
    assert cancel.status_code == 404 and cancel.json()["code"] == "not_found"
    job = service.wait(client_a, job_id)
    assert job["state"] == "succeeded" and not job["cancel_requested"]
    for method, path in (
        ("GET", f"/jobs/{job_id}"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("GET", f"/jobs/{job_id}/report"),
        ("GET", f"/jobs/{job_id}/artifacts"),
    ):
        resp = client_b.request(method, path)
        assert resp.status_code == 404, (method, path, resp.text)
        # Same answer as for an id that never existed: nothing leaks.
        missing = client_b.request(method, path.replace(job_id, "0" * 32))
        assert resp.json()["code"] == missing.json()["code"] == "not_found"
    # B can't read A's inputs or outputs through a job either.
    for model in (
        f"s3://{service.stack.bucket}/{TENANT_A}/jobs/{job_id}/model",
        f"s3://{service.stack.bucket}/{TENANT_A}/jobs",
    ):
        assert client_b.post("/jobs", json=service.job_body(model=model)).status_code == 422

    # Links: they work without the API key, only until they expire.
    with httpx.Client(base_url=short_ttl_api, headers=client_a.headers, timeout=10) as short:
        arts = short.get(f"/jobs/{job_id}/artifacts").json()
        assert arts["expires_in"] == 2
        report = next(a for a in arts["items"] if a["name"] == "report.json")
        fresh = httpx.get(report["url"], timeout=10)
        assert fresh.status_code == 200 and len(fresh.content) == report["size"]
        # The signature covers the key: pointing the link at another object is refused.
        other = report["url"].replace("report.json", "report.html")
        assert httpx.get(other, timeout=10).status_code == 403
        time.sleep(3.5)  # S3 presigned expiry is wall-clock time; nothing to poll
        expired = httpx.get(report["url"], timeout=10)
        assert expired.status_code == 403, expired.status_code


# --------------------------------------------------------------------------------------------
# API worker processes (service.serve)


def _api_workers(service: Service) -> list[int]:
    """Pids of the stack's API worker processes (children of the launcher)."""
    api = service.stack.api
    assert api is not None and api.pid is not None
    kids = []
    for task in Path(f"/proc/{api.pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def _healthz_count(metrics: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("lorp_http_requests_total{") and 'route="/healthz"' in line
    )


def test_metrics_sum_all_api_workers(service: Service) -> None:
    assert len(_api_workers(service)) == int(service.stack.env["LORP_API_WORKERS"]) == 2
    before = _healthz_count(httpx.get(f"{service.url}/metrics", timeout=30).text)
    for _ in range(40):  # a new connection each: the kernel spreads them over the workers
        assert httpx.get(f"{service.url}/healthz", timeout=30).status_code == 200
    for _ in range(5):  # whichever worker answers the scrape counts every request
        after = _healthz_count(httpx.get(f"{service.url}/metrics", timeout=30).text)
        assert after >= before + 40


def test_killed_api_worker_is_replaced(service: Service) -> None:
    victim = _api_workers(service)[0]
    os.kill(victim, signal.SIGKILL)
    until(
        "a new API worker",
        lambda: len(pids := _api_workers(service)) == 2 and victim not in pids,
    )
    # connections queued on the dead worker's socket wait for its successor
    for _ in range(20):
        assert httpx.get(f"{service.url}/healthz", timeout=60).status_code == 200
