"""Quality guard through the REST API on the real stack (issue 8): a job whose quality gate is
broken ends ``failed`` with code ``quality_gate``, the measured numbers in the message and the
summary, and nothing published in S3; a job with ``method: "auto"`` succeeds and its report lists
the candidates it scored."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.integration.conftest import TENANT_A, Service

pytestmark = pytest.mark.integration

_NUMBER = r"\d+\.\d+"


def test_quality_gate_refuses_and_publishes_nothing(
    service: Service, client_a: httpx.Client
) -> None:
    # Removing 2 of the tiny random model's 6 blocks changes its next-token distribution (KL > 0)
    # and its top-1 choice on far more than 0.1% of tokens: both limits are broken. (Perplexity
    # is not gated: a random model's pruned perplexity may even come out lower.)
    body = service.job_body(
        evaluation=None,  # quality measured on calibration windows held out after the calibration
        holdout_windows=4,
        quality_gate={"max_kl": 0.0, "min_top1_agreement": 0.999},
    )
    resp = client_a.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job = service.wait(client_a, resp.json()["id"])

    assert job["state"] == "failed", job
    error = job["error"]
    assert error["code"] == "quality_gate"
    message = error["message"]
    assert re.search(rf"top-1 agreement {_NUMBER} < min 0\.999", message), message
    assert re.search(rf"mean KL {_NUMBER} nats > max 0", message), message
    assert "held-out calibration windows" in message and "not removed" in message

    # The summary explains the refusal with the same measurement.
    summary = job["summary"]
    assert summary is not None and summary["status"] == "refused"
    gate = summary["quality_gate"]
    assert gate["passed"] is False
    assert gate["limits"] == {"max_kl": 0.0, "min_top1_agreement": 0.999}
    assert len(gate["violations"]) == 2
    assert 0.0 <= summary["top1_agreement"] < 0.999
    assert gate["measured"]["top1_agreement"] == pytest.approx(summary["top1_agreement"])
    assert f"{summary['top1_agreement']:.4f}" in message
    assert summary["kl"] > 0 and f"{summary['kl']:.4f}" in message
    ratio = summary["perplexity_after"] / summary["perplexity_before"]
    assert summary["perplexity_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert len(summary["removed_blocks"]) == 2 and summary["num_layers"] == 6

    # No checkpoint (nor anything else) is published for a refused job; no report or artifacts.
    keys = service.artifact_keys(TENANT_A, job["id"])
    assert not [k for k in keys if "/model/" in k], keys
    assert keys == []
    assert client_a.get(f"/jobs/{job['id']}/artifacts").status_code == 409
    assert client_a.get(f"/jobs/{job['id']}/report").status_code == 409


def test_auto_method_succeeds_and_reports_its_candidates(
    service: Service, client_a: httpx.Client
) -> None:
    body = service.job_body(
        method="auto",
        score_windows=2,
        score_seq_len=16,
        # a loose gate that passes: the job is published as usual
        quality_gate={"max_ppl_ratio": 1e6},
    )
    resp = client_a.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    assert resp.json()["spec"]["method"] == "auto"
    job = service.wait(client_a, resp.json()["id"])
    assert job["state"] == "succeeded", job

    summary = job["summary"]
    assert summary["status"] == "pruned"
    assert summary["kl"] is not None and summary["top1_agreement"] is not None
    assert isinstance(summary["flags"], list)
    assert summary["quality_gate"]["passed"] is True
    assert len(summary["removed_blocks"]) == 2

    report = client_a.get(f"/jobs/{job['id']}/report")
    assert report.status_code == 200, report.text
    details = report.json()["selection"]["details"]
    candidates = details["candidates"]
    names = [c["name"] for c in candidates]
    assert len(candidates) >= 3, names
    assert any(c["method"] == "shortgpt" for c in candidates), names
    assert any(c["method"] == "streamline" for c in candidates), names
    assert any(c["method"] == "lorp" for c in candidates), names
    chosen = [c for c in candidates if c.get("chosen")]
    assert len(chosen) == 1
    assert sorted(chosen[0]["removed"]) == sorted(summary["removed_blocks"])
    # the chosen candidate has the lowest measured loss on the scoring windows
    assert details["objective"] == "nll"
    assert chosen[0]["nll"] == min(c["nll"] for c in candidates)

    keys = service.artifact_keys(TENANT_A, job["id"])
    assert any(k.endswith("/model/model.safetensors") for k in keys), keys
    assert any(k.endswith("/manifest.json") for k in keys), keys


def test_compensated_job_publishes_the_folded_checkpoint(
    service: Service, client_a: httpx.Client
) -> None:
    """``compensate: true`` and ``temperature: true`` through the REST API: lorp-loss's
    selection with the fitted fold and logit scale; the report records what was fitted; a
    non-boolean value is a 422 naming the field."""
    bad = client_a.post(
        "/jobs",
        json=service.job_body(
            compensate="yes",
            compensation_windows=0,
            compensation_tune_windows=-1,
            temperature=1,
            temperature_windows=0,
        ),
    )
    assert bad.status_code == 422, bad.text
    fields = {tuple(e["loc"])[-1] for e in bad.json()["detail"]}
    expected = {
        "compensate",
        "compensation_windows",
        "compensation_tune_windows",
        "temperature",
        "temperature_windows",
    }
    assert expected <= fields, bad.text

    body = service.job_body(
        method="lorp-loss", score_windows=2, score_seq_len=16, compensate=True,
        compensation_windows=3, compensation_tune_windows=1, temperature=True,
        temperature_windows=2,
    )  # fmt: skip
    resp = client_a.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    assert resp.json()["spec"]["compensate"] is True
    job = service.wait(client_a, resp.json()["id"])
    assert job["state"] == "succeeded", job

    report = client_a.get(f"/jobs/{job['id']}/report").raise_for_status().json()
    comp = report["extra"]["compensation"]
    assert report["extra"]["config"]["compensate"] is True
    assert comp["tokens"] == 3 * 32 and comp["blocks"], comp
    assert comp["tuning"]["windows"] == 1, comp  # the strength chosen on the 4th window
    assert comp["strength"] in {row["strength"] for row in comp["tuning"]["measured"]}, comp
    removed = sorted(job["summary"]["removed_blocks"])
    assert [b for r in comp["runs"] for b in r["run"]] == removed
    assert all(0 < r["relative_residual"] < 1 for r in comp["runs"] if r["block"] is not None)
    assert "compensation" in report["timings_s"] and "temperature" in report["timings_s"]
    temp = comp["temperature"]
    assert temp["predictions"] == 2 * len(range(0, 31, 4)) and temp["scale"] > 0, temp
    assert temp["nll_after"] <= temp["nll_before"]
    keys = service.artifact_keys(TENANT_A, job["id"])
    assert any(k.endswith("/model/model.safetensors") for k in keys), keys
    assert comp["stored_inputs"] is True  # the fits read the capture's block inputs

    # method "lorp-fold" = lorp-loss with both corrections: the same result
    fold_body = {k: v for k, v in body.items() if k not in ("method", "compensate", "temperature")}
    resp = client_a.post("/jobs", json={**fold_body, "method": "lorp-fold"})
    assert resp.status_code == 202, resp.text
    assert resp.json()["spec"]["method"] == "lorp-fold"
    fold = service.wait(client_a, resp.json()["id"])
    assert fold["state"] == "succeeded", fold
    fold_report = client_a.get(f"/jobs/{fold['id']}/report").raise_for_status().json()
    fold_comp = fold_report["extra"]["compensation"]
    assert fold_report["extra"]["config"]["compensate"] is True
    assert fold_report["extra"]["config"]["temperature"] is True
    assert sorted(fold["summary"]["removed_blocks"]) == removed
    assert fold_comp["strength"] == comp["strength"]
    assert fold_comp["temperature"]["scale"] == pytest.approx(temp["scale"], rel=1e-6)
