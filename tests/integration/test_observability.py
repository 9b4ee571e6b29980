"""Observability on the real stack (issue 24 item 6): after a job, ``/metrics`` (any API
process) shows the per-stage durations the worker recorded and the finished-job count."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.integration.conftest import Service

pytestmark = pytest.mark.integration


def _value(text: str, pattern: str) -> float:
    match = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.M)
    assert match, pattern
    return float(match.group(1))


def test_job_stage_durations_and_outcomes_are_exported(
    service: Service, client_a: httpx.Client
) -> None:
    before = httpx.get(f"{service.url}/metrics", timeout=30).text
    done = 0.0
    if 'lorp_jobs_finished_total{state="succeeded"}' in before:
        done = _value(before, r'lorp_jobs_finished_total\{state="succeeded"\}')
    job_id = client_a.post("/jobs", json=service.job_body()).json()["id"]
    assert service.wait(client_a, job_id)["state"] == "succeeded"
    text = httpx.get(f"{service.url}/metrics", timeout=30).text
    assert _value(text, r'lorp_jobs_finished_total\{state="succeeded"\}') >= done + 1
    for stage in ("downloading", "calibration", "selection", "evaluation", "uploading"):
        count = _value(text, rf'lorp_job_stage_duration_seconds_count\{{stage="{stage}"\}}')
        inf = _value(
            text, rf'lorp_job_stage_duration_seconds_bucket\{{le="\+Inf",stage="{stage}"\}}'
        )
        assert count >= 1 and inf == count, stage
