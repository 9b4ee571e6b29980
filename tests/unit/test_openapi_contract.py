"""The OpenAPI document as a client generator reads it: clean operation ids, the ``X-API-Key``
security scheme on every route that needs a key, and the documented error responses (no
process: the app is built in-process and only its schema is read)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from jobcore.config import Settings
from service.main import create_app

KEY = "k" * 16

# operationId -> (method, path): what a generated client's functions are called
OPERATIONS = {
    "health": ("get", "/healthz"),
    "ready": ("get", "/readyz"),
    "metrics": ("get", "/metrics"),
    "create_job": ("post", "/jobs"),
    "list_jobs": ("get", "/jobs"),
    "get_job": ("get", "/jobs/{job_id}"),
    "delete_job": ("delete", "/jobs/{job_id}"),
    "cancel_job": ("post", "/jobs/{job_id}/cancel"),
    "get_job_report": ("get", "/jobs/{job_id}/report"),
    "get_job_artifacts": ("get", "/jobs/{job_id}/artifacts"),
}
PUBLIC = {"health", "ready", "metrics"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    settings = Settings(
        s3_access_key_id="ak",
        s3_secret_access_key="sk",
        s3_bucket="lorp-artifacts",
        api_keys={KEY: "acme"},
    )
    return create_app(settings).openapi()


def _operations(spec: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    out: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            assert op["operationId"] not in out, f"duplicate operationId {op['operationId']}"
            out[op["operationId"]] = (method, path, op)
    return out


def test_operation_ids_are_clean_names(spec: dict[str, Any]) -> None:
    ops = _operations(spec)
    assert {k: (m, p) for k, (m, p, _) in ops.items()} == OPERATIONS
    for op_id, (method, _, _) in ops.items():
        # snake_case words, none of FastAPI's generated path/method suffixes
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", op_id), op_id
        assert not op_id.endswith(f"_{method}") and "_jobs_" not in op_id, op_id


def test_api_key_security_scheme(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert len(schemes) == 1
    ((name, scheme),) = schemes.items()
    assert scheme["type"] == "apiKey" and scheme["in"] == "header"
    assert scheme["name"] == "X-API-Key"
    for op_id, (_, _, op) in _operations(spec).items():
        if op_id in PUBLIC:
            assert "security" not in op, op_id
        else:
            assert op["security"] == [{name: []}], op_id
            assert "401" in op["responses"], op_id
            # the key is the security scheme, not an ordinary header parameter
            params = [p["name"].lower() for p in op.get("parameters", [])]
            assert "x-api-key" not in params, op_id


def test_quota_and_delete_responses_documented(spec: dict[str, Any]) -> None:
    ops = _operations(spec)
    for op_id, (_, _, op) in ops.items():
        if op_id not in PUBLIC:
            assert "429" in op["responses"], f"{op_id}: no 429 (rate limit) documented"
            assert "Retry-After" in op["responses"]["429"].get("headers", {}), op_id
    assert "quota" in ops["create_job"][2]["responses"]["429"]["description"]
    delete = ops["delete_job"][2]["responses"]
    assert {"204", "404", "409"} <= set(delete)
