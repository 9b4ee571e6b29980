"""Observability on the real stack (issue 24 item 6): after a job, ``/metrics`` (any API
process) shows the per-stage durations the worker recorded and the finished-job count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Service

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


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


def test_queues_and_worker_heartbeats_are_exported(service: Service) -> None:
    text = httpx.get(f"{service.url}/metrics", timeout=30).text
    for queue in ("cpu", "gpu", "lorp.webhooks"):
        assert _value(text, rf'lorp_queue_length\{{queue="{queue}"\}}') >= 0
    assert _value(text, r'lorp_workers_live\{device_class="cpu"\}') >= 1
    ages = re.findall(
        r'^lorp_worker_heartbeat_age_seconds\{device_class="cpu",worker="[^"]+"\} (\S+)$',
        text,
        re.M,
    )
    assert ages and min(float(a) for a in ages) < 90  # refreshed every 30 s


def test_every_metric_of_the_grafana_dashboard_is_exported(
    service: Service, client_a: httpx.Client
) -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "lorp-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    found = {n for e in exprs for n in re.findall(r"\b(lorp_[a-z_]+?)(?:_bucket)?\b", e)}
    names = {n.removesuffix("_total") for n in found}
    job_id = client_a.post("/jobs", json=service.job_body()).json()["id"]
    service.wait(client_a, job_id)
    text = httpx.get(f"{service.url}/metrics", timeout=30).text
    exported = {
        n.removesuffix("_total") for n in re.findall(r"^# TYPE (lorp_[a-z_]+) ", text, re.M)
    }
    assert names and names <= exported, names - exported
