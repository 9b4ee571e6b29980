"""The local stack as the integration tests and the reliability benchmark drive it.

Tenants and their API keys, the buckets, the model-size limit the worker is started with, the
:class:`Service` handle (the running :class:`~devstack.stack.LocalStack` plus the inputs uploaded
to it), the sample texts, and the Redis keys of the test-only hold point
(``tests.integration.hold_worker``: the real worker that parks a job at a chosen progress report).
Nothing here starts anything or imports the service: ``tests/integration/conftest.py`` and
``benchmarks/reliability/run.py`` build their stacks with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .faults import FaultProxy
from .stack import LocalStack

__all__ = [
    "ARTIFACT_BUCKET",
    "CANCEL_POINTS",
    "HELD_PREFIX",
    "HOLD_KEY",
    "INPUT_BUCKET",
    "KEY_A",
    "KEY_B",
    "MAX_MODEL_BYTES",
    "OOM_KEY",
    "SHARED_DATA",
    "SMALL_BENCH",
    "TENANT_A",
    "TENANT_B",
    "TERMINAL",
    "Service",
    "sample_text",
    "until",
    "upload_inputs",
]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
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

# Redis keys of the test-only hold point (see ``tests.integration.hold_worker``).
HOLD_KEY = "lorp:test:hold"
HELD_PREFIX = "lorp:test:held:"
# While this key holds a stage name, the test worker raises a device out-of-memory error inside
# that stage's work (``tests.integration.hold_worker``).
OOM_KEY = "lorp:test:oom"

# Progress reports at which a job is parked before it is cancelled, one per stage the worker
# reports. "downloading#2" is after the inputs are on the worker's disk; "uploading#3" after two
# artifacts are already in the bucket.
CANCEL_POINTS = (
    "downloading#2",
    "loading",
    "calibration",
    "selection",
    "evaluation",
    "benchmark",
    "pruning",
    "saving",
    "report",
    "uploading#3",
)

# A one-workload benchmark: with an evaluation text, every pipeline stage exists.
SMALL_BENCH = {
    "prefill": [[1, 16]],
    "decode": [],
    "warmup": 0,
    "repetitions": 10,
    "measure_blocks": False,
}


def sample_text(name: str, fallback_seed: str, size: int) -> str:
    """The first ``size`` characters of the shared data file ``name`` (``shared/data/<name>``
    beside the checkout), else ``fallback_seed`` repeated to ``size`` characters."""
    path = SHARED_DATA / name
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")[:size]
    return (fallback_seed * (size // len(fallback_seed) + 1))[:size]


@dataclass
class Service:
    """The running stack plus what was uploaded to it."""

    stack: LocalStack
    local_root: Path
    model_uri: str
    model_local: Path
    calibration_uri: str
    evaluation_uri: str
    # the fault proxy between the workers and the object store, when the stack has one
    s3_proxy: FaultProxy | None = None

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


def until(what: str, probe: Callable[[], Any], timeout: float = 120.0, step: float = 0.05) -> Any:
    """Poll ``probe`` until it returns something true (returned); :class:`TimeoutError` naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def upload_inputs(stack: LocalStack, local_root: Path, model_dir: Path) -> Service:
    """Upload tenant A's model folder and sample texts into the input bucket of a started
    stack; the :class:`Service` handle the tests and the reliability benchmark drive."""
    s3 = stack.s3_client()
    for path in sorted(model_dir.iterdir()):
        s3.upload_file(str(path), INPUT_BUCKET, f"{TENANT_A}/models/tiny-llama/{path.name}")
    for name, src, seed, size in (
        ("calibration", "calibration/debian-handbook.en.txt", "calibration text. ", 20_000),
        ("evaluation", "eval/debian-reference.en.txt", "evaluation text. ", 10_000),
    ):
        s3.put_object(
            Bucket=INPUT_BUCKET,
            Key=f"{TENANT_A}/texts/{name}.txt",
            Body=sample_text(src, seed, size).encode(),
        )
    return Service(
        stack=stack,
        local_root=local_root,
        model_uri=f"s3://{INPUT_BUCKET}/{TENANT_A}/models/tiny-llama",
        model_local=model_dir,
        calibration_uri=f"s3://{INPUT_BUCKET}/{TENANT_A}/texts/calibration.txt",
        evaluation_uri=f"s3://{INPUT_BUCKET}/{TENANT_A}/texts/evaluation.txt",
    )
