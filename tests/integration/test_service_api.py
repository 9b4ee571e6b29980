"""API behaviour on the real stack: auth, validation, idempotency, tenants, cancel, listing,
health, fault answers. Jobs that should not run are created while the worker is stopped."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

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


@dataclass(frozen=True)
class Bad:
    """One hostile request to ``POST /jobs``: what to send and which 4xx must come back."""

    name: str
    body: Callable[[Service], Any] | None = None  # JSON value built from the stack
    loc: tuple[str, ...] | None = ("body",)  # 422: an error must point here
    status: tuple[int, ...] = (422,)
    raw: bytes | Callable[[], Iterator[bytes]] | None = None  # or bytes sent as they are
    headers: dict[str, str | bytes] = field(default_factory=dict)
    drop_key: bool = False


def _body(**changes: Any) -> Callable[[Service], dict[str, Any]]:
    """The good body with ``changes`` (a value of ``_DROP`` removes the field); a value that is
    callable gets the service (for paths under its local root)."""

    def make(service: Service) -> dict[str, Any]:
        body = service.job_body()
        for k, v in changes.items():
            if v is _DROP:
                body.pop(k, None)
            else:
                body[k] = v(service) if callable(v) else v
        return body

    return make


_DROP = object()


def _root(suffix: str) -> Callable[[Service], str]:
    return lambda s: f"{s.local_root}{suffix}"


def _chunked_big() -> Iterator[bytes]:
    yield b'{"model": "' + b"a" * 40_000
    yield b"a" * 40_000 + b'"}'


_GOOD_JSON_PREFIX = b'{"model": "s3://lorp-inputs/alpha/m", "calibration": "corpus:handbook", '

# >= 40 hostile requests, one table (issue 6, item 7). Every one must be a 4xx with a message.
BAD_REQUESTS: list[Bad] = [
    # missing or wrong-typed fields
    Bad("missing model", _body(model=_DROP), ("body", "model")),
    Bad("missing calibration", _body(calibration=_DROP), ("body", "calibration")),
    Bad("missing budget", _body(budget=_DROP), ("body", "budget")),
    Bad("empty object", lambda s: {}, ("body",)),
    Bad("body is a list", lambda s: [s.job_body()], ("body",)),
    Bad("body is null", raw=b"null", loc=("body",)),
    Bad("model is a number", _body(model=123), ("body", "model")),
    Bad("model is null", _body(model=None), ("body", "model")),
    Bad("model is empty", _body(model=""), ("body", "model")),
    Bad("windows is a string", _body(windows="4"), ("body", "windows")),
    Bad("method is a number", _body(method=1), ("body", "method")),
    Bad("budget is a string", _body(budget="6"), ("body", "budget")),
    Bad("extra field", _body(trust_remote_code=True), ("body", "trust_remote_code")),
    # budgets
    Bad("budget both", _body(budget={"blocks": 1, "fraction": 0.1}), ("body", "budget")),
    Bad("budget empty", _body(budget={}), ("body", "budget")),
    Bad("budget unknown key", _body(budget={"percent": 20}), ("body", "budget")),
    Bad("budget zero", _body(budget={"blocks": 0}), ("body", "budget", "blocks")),
    Bad("budget negative", _body(budget={"blocks": -3}), ("body", "budget", "blocks")),
    Bad("fraction negative", _body(budget={"fraction": -0.5}), ("body", "budget", "fraction")),
    Bad("fraction one", _body(budget={"fraction": 1.0}), ("body", "budget", "fraction")),
    Bad("fraction huge", _body(budget={"fraction": 1e308}), ("body", "budget", "fraction")),
    Bad("blocks huge", _body(budget={"blocks": 10**6}), ("body", "budget", "blocks")),
    Bad("blocks 128-bit", _body(budget={"blocks": 2**128}), ("body", "budget", "blocks")),
    Bad("blocks float", _body(budget={"blocks": 1.5}), ("body", "budget", "blocks")),
    Bad("blocks bool", _body(budget={"blocks": True}), ("body", "budget", "blocks")),
    Bad(
        "fraction NaN",
        raw=_GOOD_JSON_PREFIX + b'"budget": {"fraction": NaN}}',
        loc=("body", "budget", "fraction"),
    ),
    Bad(
        "budget == depth (local)",
        _body(model=lambda s: str(s.model_local), budget={"blocks": 6}),
        ("body",),
    ),
    Bad(
        "budget > depth (local)",
        _body(model=lambda s: str(s.model_local), budget={"blocks": 100}),
        ("body",),
    ),
    # other ranges and enums
    Bad("unknown method", _body(method="magic"), ("body", "method")),
    Bad("method wrong case", _body(method="LoRP"), ("body", "method")),
    Bad("unknown dtype", _body(dtype="int4"), ("body", "dtype")),
    Bad("windows zero", _body(windows=0), ("body", "windows")),
    Bad("seq_len too short", _body(seq_len=4), ("body", "seq_len")),
    Bad("huge seq_len", _body(seq_len=10**9), ("body", "seq_len")),
    Bad("batch_size zero", _body(batch_size=0), ("body", "batch_size")),
    Bad("eval_windows negative", _body(eval_windows=-1), ("body", "eval_windows")),
    Bad("num_clusters zero", _body(num_clusters=0), ("body", "num_clusters")),
    Bad(
        "few reps",
        _body(benchmark={"repetitions": 2}),
        ("body", "benchmark", "repetitions"),
    ),
    Bad("benchmark bad shape", _body(benchmark={"prefill": [[1]]}), ("body", "benchmark")),
    Bad("benchmark huge batch", _body(benchmark={"prefill": [[10**4, 16]]}), ("body", "benchmark")),
    # sources: schemes, traversal, roots, tenants, unsafe weights
    Bad("file url", _body(model="file:///etc/passwd"), ("body", "model")),
    Bad("file url evaluation", _body(evaluation="file:///etc/shadow"), ("body", "evaluation")),
    Bad(
        "metadata url",
        _body(calibration="http://169.254.169.254/latest/meta-data"),
        ("body", "calibration"),
    ),
    Bad(
        "metadata url model",
        _body(model="http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
        ("body", "model"),
    ),
    Bad("https url", _body(model="https://example.com/m.gguf"), ("body", "model")),
    Bad("ip bucket", _body(model="s3://169.254.169.254/latest"), ("body", "model")),
    Bad("dotdot", _body(model=_root("/../../etc")), ("body", "model")),
    Bad("dotdot in s3 key", _body(model="s3://lorp-inputs/alpha/../beta/m"), ("body", "model")),
    Bad("dotdot calibration", _body(calibration=_root("/../x.txt")), ("body", "calibration")),
    Bad("encoded dotdot", _body(model="/%2e%2e/%2e%2e/etc"), ("body", "model")),
    Bad("outside root", _body(calibration="/etc/hostname"), ("body", "calibration")),
    Bad("symlink escape", _body(calibration=_root("/escape")), ("body", "calibration")),
    Bad("link in model folder", _body(model=_root("/linked-model")), ("body", "model")),
    Bad("link beside gguf", _body(model=_root("/linked-gguf/m.gguf")), ("body", "model")),
    Bad("relative", _body(model="models/tiny"), ("body", "model")),
    Bad("hub disabled", _body(model="hf:org/name"), ("body", "model")),
    Bad("unknown corpus", _body(calibration="corpus:nope"), ("body", "calibration")),
    Bad(
        "other tenant prefix",
        _body(model="s3://lorp-artifacts/beta/jobs/x/model"),
        ("body", "model"),
    ),
    Bad("pickle only", _body(model=_root("/pickle-model")), ("body", "model")),
    Bad("pickle file", _body(model=_root("/pickle-model/pytorch_model.bin")), ("body", "model")),
    Bad("bad gguf name", _body(gguf_file="../x.gguf"), ("body", "gguf_file")),
    Bad(
        "gguf_file with a .gguf model",
        _body(model="s3://lorp-inputs/alpha/m.gguf", gguf_file="m.gguf"),
        ("body",),
    ),
    # junk unicode and junk bytes
    Bad("junk unicode", _body(model="s3://b\u0000ad/\ud800"), ("body", "model")),
    Bad("lone surrogate", _body(calibration="corpus:\udc80"), ("body", "calibration")),
    Bad("zero-width corpus", _body(calibration="corpus:hand\u200bbook"), ("body", "calibration")),
    Bad("rtl override method", _body(method="\u202elorp"), ("body", "method")),
    Bad(
        "invalid utf-8",
        raw=_GOOD_JSON_PREFIX + b'"budget": {"blocks": 2}, "x": "\xff\xfe"}',
        status=(400, 422),
    ),
    Bad("not json", raw=b"{not json"),
    Bad("truncated json", raw=_GOOD_JSON_PREFIX[:-3]),
    Bad("deeply nested", raw=b"[" * 20_000 + b"]" * 20_000, loc=None, status=(400, 422)),
    # transport: size, content type, headers
    Bad(
        "oversized body",
        _body(model="s3://lorp-inputs/" + "a" * 200_000),
        loc=None,
        status=(413,),
    ),
    Bad("oversized chunked", raw=_chunked_big, loc=None, status=(413,)),
    Bad(
        "idempotency key with space",
        _body(),
        ("header", "idempotency-key"),
        headers={"Idempotency-Key": "has space"},
    ),
    Bad(
        "idempotency key too long",
        _body(),
        ("header", "idempotency-key"),
        headers={"Idempotency-Key": "k" * 300},
    ),
    Bad("missing API key", _body(), loc=None, status=(401,), drop_key=True),
    Bad("unknown API key", _body(), None, (401,), headers={"X-API-Key": "not-a-key-0000"}),
    Bad("binary API key", _body(), None, (401,), headers={"X-API-Key": b"\xff\xfe-key-1234"}),
]


def _bad_ids() -> list[str]:
    return [b.name for b in BAD_REQUESTS]


@pytest.fixture(scope="module")
def hostile_files(service: Service) -> Iterator[None]:
    escape = service.local_root / "escape"
    if not escape.exists():
        escape.symlink_to("/etc/hostname")
    pickle_dir = service.local_root / "pickle-model"
    pickle_dir.mkdir(exist_ok=True)
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (pickle_dir / "config.json").write_text("{}")
    # a model folder inside the root whose tokenizer leaves it; a GGUF beside such a link
    linked = service.local_root / "linked-model"
    linked.mkdir(exist_ok=True)
    (linked / "model.safetensors").write_bytes(b"\0" * 8)
    if not (linked / "tokenizer.json").is_symlink():
        (linked / "tokenizer.json").symlink_to("/etc/hostname")
    gguf_dir = service.local_root / "linked-gguf"
    gguf_dir.mkdir(exist_ok=True)
    (gguf_dir / "m.gguf").write_bytes(b"GGUF")
    if not (gguf_dir / "tokenizer_config.json").is_symlink():
        (gguf_dir / "tokenizer_config.json").symlink_to("/etc/hostname")
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
