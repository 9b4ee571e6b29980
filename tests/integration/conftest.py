"""Fixtures for service integration tests: one real stack per session (redis-server, SeaweedFS,
uvicorn, a prefork Celery worker from ``devstack``), a tiny random Llama saved as
safetensors and uploaded to S3, and small calibration/evaluation texts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import LocalStack
from tests.tiny_models import build_tiny, tiny_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
INPUT_BUCKET = "lorp-inputs"
ARTIFACT_BUCKET = "lorp-artifacts"
KEY_A = "key-alpha-0123456789"
KEY_B = "key-beta-0123456789"
TENANT_A = "alpha"
TENANT_B = "beta"
TERMINAL = {"succeeded", "failed", "cancelled"}
# The worker refuses models whose weights need more than this in memory (the tiny test model
# needs ~0.26 MB in float32; tests/integration/test_reliability.py builds bigger ones).
MAX_MODEL_BYTES = 2_000_000


def _text(name: str, fallback_seed: str, size: int) -> str:
    path = SHARED_DATA / name
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")[:size]
    return (fallback_seed * (size // len(fallback_seed) + 1))[:size]


@dataclass
class Service:
    """The running stack plus what the tests uploaded to it."""

    stack: LocalStack
    local_root: Path
    model_uri: str
    model_local: Path
    calibration_uri: str
    evaluation_uri: str

    @property
    def url(self) -> str:
        return self.stack.api_url

    def client(self, key: str | None = KEY_A) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10.0)

    def s3(self) -> Any:
        return self.stack.s3_client()

    def redis(self) -> Any:
        """A Redis client on the stack's job store (for test-only keys and inspection)."""
        from redis import Redis

        return Redis.from_url(self.stack.redis.url, decode_responses=True, socket_timeout=5)

    def artifact_keys(self, tenant: str, job_id: str) -> list[str]:
        resp = self.s3().list_objects_v2(Bucket=ARTIFACT_BUCKET, Prefix=f"{tenant}/jobs/{job_id}/")
        return sorted(o["Key"] for o in resp.get("Contents", []))

    def job_body(self, **overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_uri,
            "calibration": self.calibration_uri,
            "evaluation": self.evaluation_uri,
            "method": "lorp",
            "budget": {"blocks": 2},
            "windows": 4,
            "seq_len": 32,
            "eval_windows": 4,
        }
        body.update(overrides)
        return body

    def wait(
        self,
        client: httpx.Client,
        job_id: str,
        until: Callable[[dict[str, Any]], bool] = lambda j: j["state"] in TERMINAL,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = client.get(f"/jobs/{job_id}").raise_for_status().json()
            if until(job):
                return dict(job)
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s: {job}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("stack")
    local_root = tmp_path_factory.mktemp("local-root")
    corpus = local_root / "corpus.txt"
    corpus.write_text(_text("calibration/debian-handbook.en.txt", "calibration text. ", 20_000))

    model_dir = local_root / "tiny-llama"
    model = build_tiny("llama")
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)

    stack = LocalStack(
        root,
        bucket=ARTIFACT_BUCKET,
        extra_buckets=[INPUT_BUCKET],
        api_keys={KEY_A: TENANT_A, KEY_B: TENANT_B},
        local_roots=[local_root],
        corpora={"handbook": corpus},
        settings={
            "LORP_PRESIGN_TTL_SECONDS": "600",
            "LORP_MAX_MODEL_BYTES": str(MAX_MODEL_BYTES),
        },
        # one thread: the tiny model gains nothing from more, and a shared CPU punishes them
        worker_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        # the real worker plus a test-only hold point (inert unless a test sets its Redis key)
        worker_app="tests.integration.hold_worker",
    )
    with stack:
        s3 = stack.s3_client()
        for path in sorted(model_dir.iterdir()):
            s3.upload_file(str(path), INPUT_BUCKET, f"{TENANT_A}/models/tiny-llama/{path.name}")
        s3.put_object(
            Bucket=INPUT_BUCKET,
            Key=f"{TENANT_A}/texts/calibration.txt",
            Body=_text("calibration/debian-handbook.en.txt", "calibration text. ", 20_000).encode(),
        )
        s3.put_object(
            Bucket=INPUT_BUCKET,
            Key=f"{TENANT_A}/texts/evaluation.txt",
            Body=_text("eval/debian-reference.en.txt", "evaluation text. ", 10_000).encode(),
        )
        yield Service(
            stack=stack,
            local_root=local_root,
            model_uri=f"s3://{INPUT_BUCKET}/{TENANT_A}/models/tiny-llama",
            model_local=model_dir,
            calibration_uri=f"s3://{INPUT_BUCKET}/{TENANT_A}/texts/calibration.txt",
            evaluation_uri=f"s3://{INPUT_BUCKET}/{TENANT_A}/texts/evaluation.txt",
        )


@pytest.fixture
def client_a(service: Service) -> Iterator[httpx.Client]:
    with service.client(KEY_A) as c:
        yield c


@pytest.fixture
def client_b(service: Service) -> Iterator[httpx.Client]:
    with service.client(KEY_B) as c:
        yield c
