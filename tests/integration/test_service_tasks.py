"""Downstream task accuracy through the REST API on the real stack (issue 23 item 1): a job with
``tasks`` and a small ``task_limit`` succeeds with the accuracies and retention in its summary
and report (the task data named as the service's, not by the worker's folder); bad task options
are a 422 naming the field. The stack's LORP_TASKS_DIR is tiny task data
(``tests.integration.conftest``)."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import Service

pytestmark = pytest.mark.integration

TASKS = ["piqa", "winogrande", "boolq"]


def test_job_with_tasks_reports_accuracy_and_retention(
    service: Service, client_a: httpx.Client
) -> None:
    body = service.job_body(tasks=TASKS, task_limit=4)
    resp = client_a.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    assert resp.json()["spec"]["tasks"] == TASKS
    job = service.wait(client_a, resp.json()["id"])
    assert job["state"] == "succeeded", job

    summary = job["summary"]
    by_task = summary["task_retention_by_task"]
    assert list(by_task) == TASKS
    assert 0.0 <= summary["task_accuracy_before"] <= 1.0
    assert 0.0 <= summary["task_accuracy_after"] <= 1.0

    report = client_a.get(f"/jobs/{job['id']}/report")
    assert report.status_code == 200, report.text
    tasks = report.json()["tasks"]
    assert tasks["limit"] == 4 and list(tasks["tasks"]) == TASKS
    assert tasks["removed"] == summary["removed_blocks"]
    assert tasks["average"]["dense"] == pytest.approx(summary["task_accuracy_before"])
    assert tasks["average"]["retention"] == summary["task_retention"]
    for name in TASKS:
        t = tasks["tasks"][name]
        assert t["n"] == 4 and t["retention"] == by_task[name]
        assert t["dense"]["stderr"] is not None
    # the operator's folder is not shown to the user
    assert tasks["data"] == "the service's task data (lm-eval 0-shot subsets)"
    config = report.json()["extra"]["config"]
    assert config["task_data_dir"] == tasks["data"] and config["tasks"] == TASKS


def test_bad_task_options_are_422(service: Service, client_a: httpx.Client) -> None:
    bad = client_a.post("/jobs", json=service.job_body(tasks=["piqa", "mmlu"], task_limit=0))
    assert bad.status_code == 422, bad.text
    named = {str(part) for e in bad.json()["detail"] for part in e["loc"]}
    assert {"tasks", "task_limit"} <= named, bad.text
    gate = client_a.post("/jobs", json=service.job_body(quality_gate={"min_task_retention": 0.9}))
    assert gate.status_code == 422 and "needs tasks" in gate.text, gate.text
