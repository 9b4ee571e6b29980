"""A client generated from the running API's ``/openapi.json`` with openapi-python-client (as a
platform team would) reads naturally and works: ``create_job`` / ``get_job`` / ... functions, the
``X-API-Key`` scheme through ``AuthenticatedClient``, one real job submitted and followed to
``succeeded`` through it against the real stack."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from devstack.testbed import KEY_A, TERMINAL, Service

pytest.importorskip("openapi_python_client")
pytestmark = pytest.mark.integration

PACKAGE = "lorp_generated_client"


@pytest.fixture(scope="module")
def generated(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The generated package's parent folder (on ``sys.path`` while the module's tests run)."""
    root = tmp_path_factory.mktemp("generated")
    schema = root / "openapi.json"
    schema.write_text(json.dumps(httpx.get(f"{service.url}/openapi.json", timeout=30).json()))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(schema),
         "--meta", "none", "--output-path", str(root / PACKAGE)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(root))
    try:
        yield root / PACKAGE
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{PACKAGE}.{name}")


def test_generated_client_names_and_job(service: Service, generated: Path) -> None:
    api = sorted(p.stem for p in (generated / "api" / "jobs").glob("*.py") if p.stem != "__init__")
    assert {"create_job", "get_job", "list_jobs", "cancel_job", "delete_job"} <= set(api)
    client_mod = _module("client")
    models = _module("models")
    create_job, get_job = _module("api.jobs.create_job"), _module("api.jobs.get_job")

    anonymous = client_mod.Client(base_url=service.url)
    refused = create_job.sync_detailed(
        client=anonymous, body=models.JobCreate.from_dict(service.job_body())
    )
    assert refused.status_code == 401
    assert isinstance(refused.parsed, models.ErrorResponse)
    assert refused.parsed.code == "unauthorized"

    # the security scheme: the key goes in X-API-Key, without a prefix
    client = client_mod.AuthenticatedClient(
        base_url=service.url, token=KEY_A, prefix="", auth_header_name="X-API-Key"
    )
    created = create_job.sync_detailed(
        client=client, body=models.JobCreate.from_dict(service.job_body())
    )
    assert created.status_code == 202, created.content
    job: Any = created.parsed
    assert isinstance(job, models.JobPublic) and job.state.value == "queued"
    deadline = time.monotonic() + 180
    while job.state.value not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job.id} still {job.state.value}"
        time.sleep(0.3)
        job = get_job.sync(job.id, client=client)
        assert isinstance(job, models.JobPublic)
    assert job.state.value == "succeeded", job.to_dict()
    assert job.summary is not None and len(job.summary.removed_blocks) == 2
