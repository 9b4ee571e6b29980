"""Property-based API testing with schemathesis against the real uvicorn server of the stack:
for every operation in the app's OpenAPI document, schema-valid (positive) and schema-violating
(negative) requests must never get a 5xx, and every response must match the document (status
code declared, content type, headers, body schema). The number of examples is bounded so the
whole run stays well under two minutes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import KEY_A, Service

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 25  # per generation mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_schema(service: Service) -> Any:
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json")


@pytest.fixture
def cancel_what_it_submits(service: Service, client_a: httpx.Client) -> Iterator[None]:
    """Schema-valid bodies can be accepted jobs (pointing at nothing real): cancel the queued
    ones afterwards so the worker doesn't spend the rest of the suite on them."""
    before = {j["id"] for j in client_a.get("/jobs", params={"limit": 100}).json()["items"]}
    yield
    cursor = None
    while True:
        params: dict[str, Any] = {"state": "queued", "limit": 100}
        if cursor:
            params["cursor"] = cursor
        page = client_a.get("/jobs", params=params).json()
        for job in page["items"]:
            if job["id"] not in before:
                client_a.post(f"/jobs/{job['id']}/cancel")
        cursor = page["next_cursor"]
        if not cursor:
            break


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_conformance(
    service: Service, api_schema: Any, cancel_what_it_submits: None, mode: GenerationMode
) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /jobs", "GET /jobs/{job_id}", "GET /jobs/{job_id}/artifacts"} <= labels
    strategy = st.one_of(
        [op.as_strategy(generation_mode=mode, headers={"X-API-Key": KEY_A}) for op in operations]
    )
    seen: dict[str, int] = {}
    statuses: dict[int, int] = {}

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES_PER_OPERATION * len(operations),
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        seen[case.operation.label] = seen.get(case.operation.label, 0) + 1
        response = case.call_and_validate(base_url=service.url, checks=CHECKS, timeout=10)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    run()
    print(f"{mode.value}: requests per operation {seen}; statuses {statuses}")
    if mode == GenerationMode.POSITIVE:
        assert set(seen) == labels, seen  # every operation was exercised
    else:  # only operations with constrained inputs can be sent schema-violating data
        assert {"POST /jobs", "GET /jobs"} <= set(seen), seen
    assert not any(code >= 500 for code in statuses), statuses
