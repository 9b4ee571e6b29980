"""Fixtures for service integration tests: one real stack per session (redis-server, SeaweedFS,
uvicorn, a prefork Celery worker from ``devstack``), a tiny random Llama saved as
safetensors and uploaded to S3, and small calibration/evaluation texts. The stack's tenants,
keys, buckets and the :class:`~devstack.testbed.Service` handle live in ``devstack.testbed``
(the reliability benchmark uses them too)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from devstack import LocalStack
from devstack.faults import FaultProxy
from devstack.testbed import (
    ARTIFACT_BUCKET,
    INPUT_BUCKET,
    KEY_A,
    KEY_B,
    MAX_MODEL_BYTES,
    TENANT_A,
    TENANT_B,
    Service,
    sample_text,
    upload_inputs,
)
from tests.tiny_models import build_tiny, tiny_tokenizer
from tests.tiny_tasks import write_tiny_tasks

#: The stack's webhook master secret (tenants' secrets derive from it: jobcore.webhooks).
WEBHOOK_SECRET = "integration-webhook-secret"

__all__ = [  # the stack's names, for the tests that import them from here
    "ARTIFACT_BUCKET",
    "INPUT_BUCKET",
    "KEY_A",
    "KEY_B",
    "MAX_MODEL_BYTES",
    "TENANT_A",
    "TENANT_B",
    "WEBHOOK_SECRET",
    "Service",
    "client_a",
    "client_b",
    "service",
]


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("stack")
    local_root = tmp_path_factory.mktemp("local-root")
    corpus = local_root / "corpus.txt"
    corpus.write_text(
        sample_text("calibration/debian-handbook.en.txt", "calibration text. ", 20_000)
    )

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
            # tiny task data in the shared data's schema (not the real files: their size)
            "LORP_TASKS_DIR": str(write_tiny_tasks(tmp_path_factory.mktemp("tasks"))),
            # webhooks to receivers the tests run on loopback (test_webhooks_e2e)
            "LORP_WEBHOOK_ALLOWED_HOSTS": json.dumps(["127.0.0.1"]),
            "LORP_WEBHOOK_ALLOW_PRIVATE": "true",
            "LORP_WEBHOOK_ALLOW_HTTP": "true",
            "LORP_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "LORP_WEBHOOK_BACKOFF_SECONDS": "0.5",
            "LORP_WEBHOOK_TIMEOUT_SECONDS": "2",
        },
        housekeeper=True,
        # one thread: the tiny model gains nothing from more, and a shared CPU punishes them
        worker_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        # the real worker plus a test-only hold point (inert unless a test sets its Redis key)
        worker_app="tests.integration.hold_worker",
        workers=0,  # started below, behind the fault proxy
        # the CPU pool's queue (jobcore.routing): every job of these tests is routed there
        worker_queues=["cpu"],
    )
    # the workers reach the object store through a fault proxy (latency, resets on demand);
    # the API and the tests reach it directly
    with stack, FaultProxy(urlsplit(stack.s3.endpoint_url).port or 0) as proxy:
        stack.worker_env["LORP_S3_ENDPOINT_URL"] = proxy.url
        stack.add_worker()
        svc = upload_inputs(stack, local_root, model_dir)
        svc.s3_proxy = proxy
        yield svc


@pytest.fixture
def client_a(service: Service) -> Iterator[httpx.Client]:
    with service.client(KEY_A) as c:
        yield c


@pytest.fixture
def client_b(service: Service) -> Iterator[httpx.Client]:
    with service.client(KEY_B) as c:
        yield c
