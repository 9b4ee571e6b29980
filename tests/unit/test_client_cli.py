"""lorp-jobs and the Python client without a server: argument parsing, error reporting, and the
client's HTTP handling against an in-process httpx transport (no network)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.client import (
    ApiError,
    ChecksumError,
    ClientError,
    Job,
    LorpClient,
    WaitTimeoutError,
    overall_fraction,
)
from service.client_cli import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ProgressBar,
    UsageError,
    build_parser,
    build_spec,
    format_job,
    main,
    run,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
API = "http://api.test"


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--api-key", "k" * 12, *argv])


# ---------------------------------------------------------------------------------------------
# argument parsing


def test_submit_flags_build_the_contract_spec() -> None:
    args = parse(
        "submit",
        "--model", "s3://in/acme/m.gguf",
        "--calibration", "corpus:wiki",
        "--evaluation", "s3://in/acme/eval.txt",
        "--blocks", "6",
        "--windows", "16", "--seq-len", "256",
        "--prefill", "1x512", "--prefill", "8x128",
        "--decode", "1x32x128",
        "--repetitions", "12",
    )  # fmt: skip
    spec = build_spec(args)
    assert spec == {
        "model": "s3://in/acme/m.gguf",
        "calibration": "corpus:wiki",
        "evaluation": "s3://in/acme/eval.txt",
        "budget": {"blocks": 6},
        "windows": 16,
        "seq_len": 256,
        "benchmark": {"prefill": [[1, 512], [8, 128]], "decode": [[1, 32, 128]], "repetitions": 12},
    }


def test_spec_file_is_merged_and_flags_override(tmp_path: Path) -> None:
    spec_file = tmp_path / "job.json"
    spec_file.write_text(
        json.dumps(
            {
                "model": "/models/a",
                "calibration": "corpus:x",
                "budget": {"blocks": 2},
                "method": "shortgpt",
                "benchmark": {"prefill": [[1, 64]], "warmup": 1},
            }
        )
    )
    args = parse("submit", "--spec", str(spec_file), "--fraction", "0.25", "--decode", "2x8x4")
    spec = build_spec(args)
    assert spec["budget"] == {"fraction": 0.25}
    assert spec["method"] == "shortgpt"
    assert spec["benchmark"] == {"prefill": [[1, 64]], "warmup": 1, "decode": [[2, 8, 4]]}


def test_no_benchmark_sends_null() -> None:
    args = parse("submit", "--model", "/m", "--calibration", "/c.txt", "--blocks", "1")
    assert "benchmark" not in build_spec(args)
    args = parse(
        "submit", "--model", "/m", "--calibration", "/c.txt", "--blocks", "1", "--no-benchmark"
    )
    assert build_spec(args)["benchmark"] is None
    args = parse("submit", "--model", "/m", "--calibration", "/c", "--blocks", "1",
                 "--no-benchmark", "--prefill", "1x8")  # fmt: skip
    with pytest.raises(UsageError, match="no-benchmark"):
        build_spec(args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["submit", "--calibration", "corpus:x", "--blocks", "3"], "--model"),
        (["submit", "--model", "/m"], "--calibration, --blocks/--fraction"),
    ],
)
def test_incomplete_spec_is_a_usage_error(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_spec(parse(*argv))


def test_bad_spec_file_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        build_spec(parse("submit", "--spec", str(bad)))
    with pytest.raises(UsageError, match="cannot read"):
        build_spec(parse("submit", "--spec", str(tmp_path / "missing.json")))
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(UsageError, match="JSON object"):
        build_spec(parse("submit", "--spec", str(arr)))


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "--model", "/m", "--blocks", "2", "--fraction", "0.1"],  # mutually exclusive
        ["submit", "--prefill", "1x"],
        ["submit", "--decode", "1x2"],
        ["submit", "--prefill", "0x16"],
        ["submit", "--method", "random"],
        ["wait", "abc", "--timeout", "-1"],
        ["list", "--state", "done"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "error:" in err
    assert "Traceback" not in err


def test_url_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORP_API_URL", "http://example.test:9000")
    monkeypatch.setenv("LORP_API_KEY", "from-env-key")
    args = build_parser().parse_args(["status", "j1"])
    assert args.url == "http://example.test:9000"
    assert args.api_key == "from-env-key"
    args = build_parser().parse_args(["--url", "http://other.test", "status", "j1"])
    assert args.url == "http://other.test"


def test_missing_api_key_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LORP_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["status", "j1"])
    assert exc.value.code == EXIT_USAGE
    assert "LORP_API_KEY" in capsys.readouterr().err


def test_unreachable_server_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = main(["--url", f"http://127.0.0.1:{port}", "--api-key", "k" * 12, "status", "j1"])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("lorp-jobs: error: cannot reach")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_console_entry_point_reports_errors_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service.client_cli", "--url", "not-a-url", "--api-key", "x" * 10,
         "list"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == EXIT_ERROR
    assert "must start with http://" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# client behaviour over an in-process transport


def _job(state: str, stage: str | None = None, fraction: float = 0.0, **extra: Any) -> Job:
    job: dict[str, Any] = {
        "id": "job1",
        "state": state,
        "created_at": "2026-01-01T00:00:00Z",
        "progress": {"stage": stage, "fraction": fraction, "message": ""},
        "error": None,
        "summary": None,
        "spec": {},
    }
    job.update(extra)
    return job  # type: ignore[return-value]


Handler = Callable[[httpx.Request], httpx.Response]


def _client(handler: Handler) -> LorpClient:
    return LorpClient(API, "secret-key-1", transport=httpx.MockTransport(handler), retries=0)


def test_api_errors_become_api_error_with_code_and_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/jobs/nope":
            return httpx.Response(404, json={"detail": "job not found", "code": "not_found"})
        return httpx.Response(
            422,
            json={
                "detail": [
                    {
                        "loc": ["body", "budget"],
                        "msg": "give exactly one of 'blocks' or 'fraction'",
                    },
                    {"loc": ["body", "model"], "msg": "path is not under an allowed local root"},
                ]
            },
        )

    with _client(handler) as api:
        with pytest.raises(ApiError) as not_found:
            api.get("nope")
        assert (not_found.value.status_code, not_found.value.code) == (404, "not_found")
        assert str(not_found.value) == "HTTP 404 not_found: job not found"
        with pytest.raises(ApiError) as invalid:
            api.submit({"model": "/x"})
        assert invalid.value.status_code == 422
        assert "budget: give exactly one" in invalid.value.message
        assert "model: path is not under" in invalid.value.message


def test_cli_prints_http_errors_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"detail": "missing or unknown API key", "code": "unauth"})

    args = parse("status", "job1")
    with _client(handler) as api, pytest.raises(ApiError) as exc:
        run(args, api, io.StringIO(), io.StringIO())
    assert "HTTP 401" in str(exc.value)


def test_submit_sends_key_and_idempotency_header() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json=_job("queued"))

    out = io.StringIO()
    args = parse("submit", "--model", "/m", "--calibration", "corpus:c", "--blocks", "2",
                 "--idempotency-key", "abc-1")  # fmt: skip
    with _client(handler) as api:
        assert run(args, api, out, io.StringIO()) == EXIT_OK
    assert out.getvalue() == "job1\n"
    request = seen[0]
    assert request.method == "POST"
    assert request.url.path == "/jobs"
    assert request.headers["X-API-Key"] == "secret-key-1"
    assert request.headers["Idempotency-Key"] == "abc-1"
    assert json.loads(request.content)["budget"] == {"blocks": 2}


@pytest.mark.parametrize(
    ("final", "code"), [("failed", EXIT_FAILED), ("cancelled", EXIT_CANCELLED)]
)
def test_wait_reports_progress_and_exit_code(final: str, code: int) -> None:
    states = iter(
        [
            _job("queued"),
            _job("running", "calibration", 0.5),
            _job("running", "benchmark", 0.25),
            _job(final, "benchmark", 0.25, error={"code": "oom", "message": "out of memory"}),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=next(states))

    err = io.StringIO()
    out = io.StringIO()
    args = parse("wait", "job1", "--interval", "0.01")
    with _client(handler) as api:
        assert run(args, api, out, err) == code
    lines = err.getvalue().splitlines()
    assert any("calibration 50%" in line for line in lines)
    assert any("benchmark 25%" in line for line in lines)
    assert f"state     {final}" in out.getvalue()
    assert "oom: out of memory" in out.getvalue()


def test_wait_timeout_raises() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=_job("running", "loading", 0.1))

    with _client(handler) as api, pytest.raises(WaitTimeoutError, match="still running"):
        api.wait("job1", timeout=0.05, poll_interval=0.01)


def test_list_follows_cursors() -> None:
    pages = {
        None: {"items": [_job("succeeded", id="a"), _job("failed", id="b")], "next_cursor": "2"},
        "2": {"items": [_job("queued", id="c")], "next_cursor": None},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params.get("state") == "queued"
        return httpx.Response(200, json=pages[request.url.params.get("cursor")])

    with _client(handler) as api:
        assert [j["id"] for j in api.iter_jobs(state="queued", page_size=2)] == ["a", "b", "c"]


def _artifact_server(files: dict[str, bytes], listed: dict[str, bytes] | None = None) -> Handler:
    """API listing ``listed`` checksums (default: the true ones) + a fake presigned store."""
    listed = files if listed is None else listed

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.test":
            assert request.url.path == "/jobs/job1/artifacts"
            items = [
                {
                    "name": name,
                    "size": len(listed[name]),
                    "sha256": hashlib.sha256(listed[name]).hexdigest(),
                    "url": f"http://store.test/bucket/t/jobs/job1/{name}?X-Amz-Signature=x",
                }
                for name in files
            ]
            return httpx.Response(200, json={"items": items, "expires_in": 60})
        assert request.url.host == "store.test"
        assert "X-API-Key" not in request.headers  # the key never goes to the object store
        name = request.url.path.split("/jobs/job1/", 1)[1]
        return httpx.Response(200, content=files[name])

    return handler


def test_download_writes_and_verifies_every_artifact(tmp_path: Path) -> None:
    files = {
        "report.json": b'{"method": "lorp"}',
        "model/model.safetensors": bytes(range(256)) * 1000,
        "manifest.json": b"{}",
    }
    with _client(_artifact_server(files)) as api:
        paths = api.download("job1", tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in paths) == sorted(files)
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert not list((tmp_path / "out").rglob(".part-*"))


def test_download_rejects_checksum_mismatch_and_leaves_nothing(tmp_path: Path) -> None:
    files = {"model.safetensors": b"real bytes"}
    tampered = {"model.safetensors": b"other byte"}  # same size, different hash
    api = _client(_artifact_server(files, listed=tampered))
    with api, pytest.raises(ChecksumError, match="sha256"):
        api.download("job1", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_download_refuses_names_escaping_the_destination(tmp_path: Path) -> None:
    files = {"../escape.txt": b"x"}
    api = _client(_artifact_server(files))
    with api, pytest.raises(ClientError, match="unsafe artifact name"):
        api.download("job1", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_job_ids_cannot_change_the_route() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    with _client(handler) as api:
        for bad in ("../admin", "a/b", "x?y", ""):
            with pytest.raises(ClientError, match="invalid job id"):
                api.get(bad)


def test_retries_transient_errors_for_reads_only() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] < 3:
            return httpx.Response(503, json={"detail": "redis down", "code": "unavailable"})
        return httpx.Response(200 if request.method == "GET" else 202, json=_job("queued"))

    transport = httpx.MockTransport(handler)
    with LorpClient(API, "key-12345678", transport=transport, retries=3) as api:
        assert api.get("job1")["state"] == "queued"
        assert calls["n"] == 3
        calls["n"] = 0
        with pytest.raises(ApiError, match="503"):  # POST without idempotency key: no retry
            api.submit({"model": "/m"})
        assert calls["n"] == 1


# ---------------------------------------------------------------------------------------------
# rendering


def test_overall_fraction_orders_stages() -> None:
    assert overall_fraction(_job("queued")) == 0.0
    loading = overall_fraction(_job("running", "loading", 1.0))
    calib = overall_fraction(_job("running", "calibration", 0.5))
    report = overall_fraction(_job("running", "report", 0.5))
    assert 0 < loading < calib < report < 1
    assert overall_fraction(_job("succeeded", "report", 0.2)) == 1.0


def test_client_stages_are_the_ones_a_job_reports() -> None:
    """The client's overall progress covers the pipeline's stages (lorp.progress.STAGES, which
    lorp.pipeline times) and exactly the stages the worker adds around them (read from the
    worker's progress calls)."""
    import re

    from lorp.progress import STAGES as PIPELINE_STAGES
    from service.client import STAGES

    runner = (Path(__file__).parents[2] / "worker" / "runner.py").read_text()
    worker_stages = set(re.findall(r'progress\(\s*"([a-z]+)"', runner))
    assert worker_stages == {"downloading", "uploading"}
    assert set(STAGES) == set(PIPELINE_STAGES) | worker_stages
    assert STAGES.index("downloading") == 0 and STAGES[-1] == "uploading"


def test_client_terminal_states_are_the_specs() -> None:
    """The client spells the terminal states out (it needs only httpx); they are the job
    spec's."""
    from jobcore.spec import TERMINAL_STATES as SPEC_TERMINAL
    from service.client import TERMINAL_STATES

    assert {s.value for s in SPEC_TERMINAL} == TERMINAL_STATES


def test_progress_bar_without_tty_prints_only_changes() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, width=10)
    progress = {"stage": "calibration", "fraction": 0.5, "message": "w 1/2"}
    bar.update(_job("running", progress=progress))
    bar.update(_job("running", progress=progress))  # unchanged: not printed again
    bar.update(_job("succeeded", "report", 1.0))
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "calibration 50%  w 1/2" in lines[0]
    assert "[##########] 100.0%" in lines[1]


def test_format_job_shows_summary() -> None:
    job = _job(
        "succeeded",
        summary={
            "method": "lorp",
            "num_layers": 30,
            "removed_blocks": [3, 7, 20],
            "rls": 0.81234,
            "num_clusters": 2,
            "prefill_speedup": 1.21,
            "decode_speedup": 1.1,
            "memory_reduction": 0.087,
            "perplexity_before": 20.5,
            "perplexity_after": 31.25,
            "perplexity_ratio": 1.524,
        },
    )
    text = format_job(job)
    assert "removed   3 of 30 blocks: [3, 7, 20]" in text
    assert "RLS 0.812" in text
    assert "prefill x1.21" in text
    assert "memory    -8.7%" in text
    assert "ppl       20.50 -> 31.25" in text


def test_method_choices_are_the_specs_methods() -> None:
    """``--method`` offers the spec's methods (the registry's, which test_service_schemas
    checks against the method files), each sent as given."""
    from jobcore.spec import Method

    (action,) = (a for a in _submit_parser()._actions if a.dest == "method")
    assert action.choices == [m.value for m in Method]
    for method in Method:
        assert build_spec(parse("submit", *_MIN, "--method", method.value))["method"] == method
    with pytest.raises(SystemExit):
        parse("submit", *_MIN, "--method", "random")


def _submit_parser() -> argparse.ArgumentParser:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["submit"]


_MIN = ("--model", "s3://inputs/acme/m", "--calibration", "corpus:wiki", "--blocks", "2")


def test_quality_gate_flags_build_the_gate(tmp_path: Path) -> None:
    assert "quality_gate" not in build_spec(parse("submit", *_MIN))
    spec = build_spec(parse("submit", *_MIN, "--max-ppl-ratio", "1.5", "--min-top1", "0.9"))
    assert spec["quality_gate"] == {"max_ppl_ratio": 1.5, "min_top1_agreement": 0.9}
    # flags add to (and override) a gate from --spec
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"quality_gate": {"max_kl": 0.5, "max_ppl_ratio": 3.0}}))
    spec = build_spec(parse("submit", *_MIN, "--spec", str(spec_file), "--max-ppl-ratio", "2"))
    assert spec["quality_gate"] == {"max_kl": 0.5, "max_ppl_ratio": 2.0}
    # the result is a valid job spec
    from jobcore.spec import JobCreate

    job = JobCreate.model_validate(build_spec(parse("submit", *_MIN, "--max-kl", "0.25")))
    assert job.quality_gate is not None and job.quality_gate.max_kl == 0.25


def test_format_job_shows_quality_flags_and_refusal() -> None:
    job = _job(
        "failed",
        error={"code": "quality_gate", "message": "quality gate failed: top-1 agreement 0.6100"},
        summary={
            "method": "auto",
            "num_layers": 6,
            "removed_blocks": [2],
            "perplexity_before": 100.0,
            "perplexity_after": 180.0,
            "perplexity_ratio": 1.8,
            "status": "refused",
            "kl": 0.91234,
            "top1_agreement": 0.61,
            "flags": ["mean KL 1.2 nats per token (flagged above 1)"],
            "quality_gate": {
                "passed": False,
                "limits": {"min_top1_agreement": 0.999},
                "measured": {"top1_agreement": 0.61},
                "violations": ["top-1 agreement 0.6100 < min 0.999"],
            },
        },
    )
    text = format_job(job)
    assert "error     quality_gate: quality gate failed" in text
    assert "KL 0.9123 nats/token" in text
    assert "top-1 agreement 61.0%" in text
    assert "gate      FAILED (min_top1_agreement 0.999)" in text
    assert "top-1 agreement 0.6100 < min 0.999" in text
    assert "refused by the quality gate" in text
    assert "flag      mean KL 1.2 nats per token" in text
    passed = format_job(
        _job("succeeded", summary={"kl": 0.01, "top1_agreement": 0.95, "flags": []})
    )
    assert "KL 0.0100" in passed and "top-1 agreement 95.0%" in passed
    assert "flag " not in passed and "refused" not in passed


def test_delete_sends_delete_and_prints(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(204)
        return httpx.Response(409, json={"detail": "job is running; cancel it first",
                                         "code": "invalid_state"})  # fmt: skip

    out = io.StringIO()
    with _client(handler) as api:
        assert run(parse("delete", "job1"), api, out, io.StringIO()) == EXIT_OK
        with pytest.raises(ApiError, match="409 invalid_state: job is running"):
            api.delete("job2")
    assert out.getvalue() == "job1 deleted\n"
    assert [(r.method, r.url.path) for r in seen] == [("DELETE", "/jobs/job1"),
                                                      ("DELETE", "/jobs/job2")]  # fmt: skip


def test_rate_limited_requests_wait_and_retry_quota_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr("service.client.time.sleep", slept.append)
    answers = [
        httpx.Response(429, json={"detail": "slow down", "code": "rate_limited"},
                       headers={"Retry-After": "2"}),
        httpx.Response(202, json=_job("queued")),
        httpx.Response(429, json={"detail": "tenant_max_queued=1", "code": "quota_exceeded"},
                       headers={"Retry-After": "30"}),
    ]  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    transport = httpx.MockTransport(handler)
    with LorpClient(API, "key-12345678", transport=transport, retries=3) as api:
        # a POST without idempotency key is retried too: a 429 means nothing was done
        assert api.submit({"model": "/m"})["state"] == "queued"
        assert slept == [2.0]
        with pytest.raises(ApiError, match="429 quota_exceeded"):
            api.submit({"model": "/m"})
    assert slept == [2.0] and not answers
