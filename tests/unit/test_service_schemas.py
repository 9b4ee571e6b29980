"""Service settings and request schemas, without any process: URI rules, budgets, bounds,
fail-fast configuration, the job summary built from a report."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from jobcore.config import Settings
from jobcore.spec import (
    NOMINAL_SCORING,
    JobCreate,
    JobSummary,
    Method,
    validate_job,
)
from lorp.errors import InvalidInputError
from lorp.gate import QualityGate
from lorp.methods import all_methods, method_names, selector
from lorp.paths import check_confined
from lorp.pipeline import PruneConfig
from lorp.report import job_summary

TENANT = "acme"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    model = root / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\0" * 8)
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))
    (root / "gguf").mkdir()
    (root / "gguf" / "m.gguf").write_bytes(b"GGUF")  # its folder is confined too
    (root / "notes.bin").write_bytes(b"\x80\x04")
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (root / "calib.txt").write_text("hello world " * 100)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "escape.txt").symlink_to(outside / "secret.txt")
    (root / "escape-dir").symlink_to(outside)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("corpus " * 100)
    return {"root": root, "outside": outside, "corpus": corpus}


@pytest.fixture
def settings(roots: dict[str, Path], tmp_path: Path) -> Settings:
    return Settings(
        s3_access_key_id="ak",
        s3_secret_access_key="sk",
        s3_bucket="lorp-artifacts",
        input_buckets=["inputs"],
        api_keys={"k" * 16: TENANT},
        local_roots=[roots["root"]],
        corpora={"wiki": roots["corpus"]},
        work_dir=tmp_path / "work",
    )


def body(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": "s3://inputs/acme/models/tiny",
        "calibration": "corpus:wiki",
        "budget": {"blocks": 2},
    }
    out.update(overrides)
    return out


def errors_of(data: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        validate_job(data, settings, TENANT)
    return info.value.errors()


def field_of(errors: list[dict[str, Any]]) -> set[str]:
    return {str(e["loc"][0]) if e["loc"] else "" for e in errors}


# -- accepted forms ------------------------------------------------------------------------


def test_defaults_and_normalisation(settings: Settings, roots: dict[str, Path]) -> None:
    job = validate_job(body(model="s3://inputs/acme/models/tiny/"), settings, TENANT)
    assert job.model == "s3://inputs/acme/models/tiny"  # trailing slash of a prefix dropped
    assert (job.method, job.windows, job.seq_len, job.batch_size) == ("lorp", 32, 512, 1)
    assert job.budget.value() == 2 and job.benchmark is None
    local = validate_job(
        body(model=str(roots["root"] / "model"), calibration=str(roots["root"] / "calib.txt")),
        settings,
        TENANT,
    )
    assert local.model == str(roots["root"] / "model")
    gguf = validate_job(body(model=str(roots["root"] / "gguf" / "m.gguf")), settings, TENANT)
    assert gguf.model.endswith("m.gguf")
    frac = validate_job(body(budget={"fraction": 0.25}), settings, TENANT)
    assert frac.budget.value() == 0.25


def test_fingerprint_is_canonical(settings: Settings) -> None:
    a = validate_job(body(windows=8, method="lorp"), settings, TENANT)
    b = validate_job({"method": "lorp", **body(), "windows": 8}, settings, TENANT)
    c = validate_job(body(windows=9), settings, TENANT)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_hub_only_when_enabled(settings: Settings) -> None:
    assert field_of(errors_of(body(model="hf:org/name"), settings)) == {"model"}
    hub = settings.model_copy(update={"allow_hub": True})
    assert validate_job(body(model="hf:org/name"), hub, TENANT).model == "hf:org/name"
    assert field_of(errors_of(body(model="hf:../../x"), hub)) == {"model"}


def test_service_bucket_needs_own_tenant_prefix(settings: Settings) -> None:
    ok = body(model="s3://lorp-artifacts/acme/jobs/abc/model")
    assert validate_job(ok, settings, TENANT).model.startswith("s3://lorp-artifacts/acme/")
    for uri in ("s3://lorp-artifacts/other/jobs/abc/model", "s3://lorp-artifacts/acmex/m"):
        assert field_of(errors_of(body(model=uri), settings)) == {"model"}


def test_s3_inputs_only_in_locations_granted_to_the_tenant(settings: Settings) -> None:
    """Issue 18: an s3:// input outside the caller's granted locations is refused with one
    message, whatever the bucket or key (nothing is looked up: no existence oracle)."""
    granted = [
        "s3://inputs/acme/models/tiny",
        "s3://inputs/acme",
        "s3://lorp-artifacts/acme/jobs/abc/model",
    ]
    for uri in granted:
        assert validate_job(body(model=uri, calibration=uri + "/c.txt"), settings, TENANT)
    refused = [
        "s3://inputs/beta/models/tiny-llama",  # another tenant's prefix in an input bucket
        "s3://inputs/acmex/models/tiny",  # a tenant whose name starts like ours
        "s3://inputs/models/acme/tiny",
        "s3://no-such-bucket/m",  # a bucket that does not exist
        "s3://other-bucket/acme/secret",  # a bucket that exists but is not an input bucket
    ]
    messages = set()
    for uri in refused:
        for field in ("model", "calibration", "evaluation"):
            errors = errors_of(body(**{field: uri}), settings)
            assert field_of(errors) == {field}, (uri, field)
            messages.add(errors[0]["msg"])
    assert messages == {
        "Value error, s3:// inputs must be inside a location granted to your tenant "
        "(s3://lorp-artifacts/acme/, s3://inputs/acme/)"
    }
    # without a tenant in the context nothing s3:// is granted
    with pytest.raises(ValidationError):
        JobCreate.model_validate(body(), context={"settings": settings, "tenant": None})


def test_explicit_per_tenant_input_prefixes(settings: Settings) -> None:
    shared = settings.model_copy(update={"tenant_inputs": {TENANT: ["s3://shared/base/llama/"]}})
    assert validate_job(body(model="s3://shared/base/llama/8b"), shared, TENANT)
    for uri in ("s3://shared/base/llamax", "s3://shared/base/other/8b", "s3://shared/acme/m"):
        assert field_of(errors_of(body(model=uri), shared)) == {"model"}
    assert shared.input_prefixes(TENANT)[-1] == "s3://shared/base/llama/"
    assert shared.input_prefixes("beta") == ["s3://lorp-artifacts/beta/", "s3://inputs/beta/"]


@pytest.mark.parametrize(
    ("update", "fragment"),
    [
        ({"LORP_TENANT_INPUTS": '{"nobody": ["s3://bbb/p/"]}'}, "without an API key"),
        ({"LORP_TENANT_INPUTS": '{"acme": ["s3://bbb/p"]}'}, "ending in '/'"),
        ({"LORP_TENANT_INPUTS": '{"acme": ["s3://bbb/"]}'}, "ending in '/'"),
        ({"LORP_TENANT_INPUTS": '{"acme": ["s3://bbb/../p/"]}'}, "ending in '/'"),
        ({"LORP_TENANT_INPUTS": '{"acme": ["s3://B_ad/p/"]}'}, "not a valid S3 bucket"),
        ({"LORP_INPUT_BUCKETS": '["Bad_Bucket"]'}, "not a valid S3 bucket"),
    ],
)
def test_input_grant_settings_fail_fast(
    update: dict[str, str], fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "LORP_S3_ACCESS_KEY_ID": "ak",
        "LORP_S3_SECRET_ACCESS_KEY": "sk",
        "LORP_S3_BUCKET": "lorp-artifacts",
        "LORP_API_KEYS": '{"kkkkkkkkkkkkkkkk": "acme"}',
        **update,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        Settings()  # type: ignore[call-arg]


# -- refused forms -------------------------------------------------------------------------

BAD_MODELS = [
    "file:///etc/passwd",
    "http://169.254.169.254/latest/meta-data/",
    "https://example.com/model.gguf",
    "ftp://x/y",
    "s3://169.254.169.254/latest",
    "s3://Bad_Bucket/key",
    "s3://bucket",
    "s3://bucket/a/../b",
    "s3://bucket/a//b",
    "models/tiny",
    "./model",
    "~/model",
    "C:\\models\\x",
    "",
    " s3://bucket/key",
    "s3://bucket/k\x00ey",
    "corpus:wiki",
    "gopher://x",
    "s3://" + "a" * 1100,
]


@pytest.mark.parametrize("uri", BAD_MODELS)
def test_bad_model_uris(settings: Settings, uri: str) -> None:
    errors = errors_of(body(model=uri), settings)
    assert field_of(errors) == {"model"}
    assert errors[0]["msg"]


@pytest.mark.parametrize(
    "uri", ["hf:org/name", "file:///etc/hostname", "http://127.0.0.1:8080/", "corpus:unknown"]
)
def test_bad_text_uris(settings: Settings, uri: str) -> None:
    assert field_of(errors_of(body(calibration=uri), settings)) == {"calibration"}
    assert field_of(errors_of(body(evaluation=uri), settings)) == {"evaluation"}


def test_local_paths_must_stay_under_roots(settings: Settings, roots: dict[str, Path]) -> None:
    root, outside = roots["root"], roots["outside"]
    cases = {
        "calibration": [
            str(outside / "secret.txt"),  # outside every root
            str(root / "escape.txt"),  # symlink pointing outside
            str(root / "escape-dir" / "secret.txt"),  # through a symlinked directory
            f"{root}/../outside/secret.txt",  # '..' segments
            str(root / "missing.txt"),  # does not exist
            str(root / "model"),  # a directory, not a text
        ],
        "model": [
            str(root / "notes.bin"),  # a file that is not .gguf
            str(root / "pickled"),  # only pickle weights
            "/etc",
        ],
    }
    for field, uris in cases.items():
        for uri in uris:
            assert field_of(errors_of(body(**{field: uri}), settings)) == {field}, uri
    with pytest.raises(InvalidInputError):
        check_confined(str(root / "escape.txt"), settings.local_roots)
    assert check_confined(str(root / "calib.txt"), settings.local_roots) == root / "calib.txt"


def test_links_under_a_local_input_are_confined_at_submit(
    settings: Settings, roots: dict[str, Path]
) -> None:
    """Issue 19: ``lorp.paths.check_confined`` runs at submission (422), not only in the worker:
    a model folder holding a link that leaves the roots, a GGUF file beside one (transformers
    reads its folder), a text that is a FIFO. The refusal never says where a link points."""
    root, outside = roots["root"], roots["outside"]
    model = root / "model"
    assert validate_job(body(model=str(model)), settings, TENANT)
    (model / "tokenizer.json").symlink_to(outside / "secret.txt")
    (msg,) = (e["msg"] for e in errors_of(body(model=str(model)), settings))
    assert "'tokenizer.json' resolves outside the allowed local roots" in msg
    assert str(outside) not in msg

    gguf = root / "gguf" / "m.gguf"
    assert validate_job(body(model=str(gguf)), settings, TENANT)
    (gguf.parent / "tokenizer_config.json").symlink_to(outside / "secret.txt")
    (msg,) = (e["msg"] for e in errors_of(body(model=str(gguf)), settings))
    assert "'tokenizer_config.json' resolves outside the allowed local roots" in msg
    assert str(outside) not in msg

    fifo = root / "calib.fifo"
    os.mkfifo(fifo)
    errors = errors_of(body(calibration=str(fifo)), settings)
    assert field_of(errors) == {"calibration"}
    assert "not a regular file" in errors[0]["msg"]


def test_symlink_escape_after_submission_is_caught_by_resolve(
    settings: Settings, roots: dict[str, Path]
) -> None:
    link = roots["root"] / "later.txt"
    link.write_text("fine")
    job = validate_job(body(calibration=str(link)), settings, TENANT)
    link.unlink()
    link.symlink_to(roots["outside"] / "secret.txt")
    with pytest.raises(InvalidInputError):
        check_confined(job.calibration, settings.local_roots)


@pytest.mark.parametrize(
    ("budget", "loc"),
    [
        ({"blocks": 1, "fraction": 0.1}, ("budget",)),
        ({}, ("budget",)),
        ({"blocks": 0}, ("budget", "blocks")),
        ({"blocks": -3}, ("budget", "blocks")),
        ({"blocks": 10**6}, ("budget", "blocks")),
        ({"blocks": 2.5}, ("budget", "blocks")),
        ({"blocks": "2"}, ("budget", "blocks")),
        ({"blocks": True}, ("budget", "blocks")),
        ({"fraction": 0.0}, ("budget", "fraction")),
        ({"fraction": 1.0}, ("budget", "fraction")),
        ({"fraction": -0.2}, ("budget", "fraction")),
        ({"fraction": "0.2"}, ("budget", "fraction")),
        ({"percent": 20}, ("budget", "percent")),
    ],
)
def test_bad_budgets(settings: Settings, budget: dict[str, Any], loc: tuple[str, ...]) -> None:
    errors = errors_of(body(budget=budget), settings)
    assert any(tuple(e["loc"][: len(loc)]) == loc for e in errors), errors


def test_budget_against_local_depth(settings: Settings, roots: dict[str, Path]) -> None:
    model = str(roots["root"] / "model")
    assert validate_job(body(model=model, budget={"blocks": 5}), settings, TENANT)
    errors = errors_of(body(model=model, budget={"blocks": 6}), settings)
    assert "only 6" in errors[0]["msg"]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"method": "random"}, "method"),
        ({"windows": 0}, "windows"),
        ({"windows": 100_000}, "windows"),
        ({"seq_len": 4}, "seq_len"),
        ({"seq_len": "512"}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_windows": -1}, "eval_windows"),
        ({"num_clusters": 0}, "num_clusters"),
        ({"dtype": "int8"}, "dtype"),
        ({"gguf_file": "../evil.gguf"}, "gguf_file"),
        ({"gguf_file": "model.bin"}, "gguf_file"),
        ({"trust_remote_code": True}, "trust_remote_code"),
        ({"benchmark": {"repetitions": 2}}, "benchmark"),
        ({"benchmark": {"prefill": [[1, 8], [1, 8]]}}, "benchmark"),
        ({"benchmark": {"prefill": [], "decode": []}}, "benchmark"),
        ({"benchmark": {"prefill": [[0, 8]]}}, "benchmark"),
        ({"benchmark": {"decode": [[1, 8]]}}, "benchmark"),
        ({"benchmark": {"prefill": [[1, 8]] * 9}}, "benchmark"),
    ],
)
def test_bad_fields(settings: Settings, override: dict[str, Any], field: str) -> None:
    assert field in field_of(errors_of(body(**override), settings))


def test_gguf_file_only_with_directory(settings: Settings) -> None:
    ok = validate_job(body(gguf_file="m.Q4.gguf"), settings, TENANT)
    assert ok.gguf_file == "m.Q4.gguf"
    errors = errors_of(body(model="s3://inputs/acme/m.gguf", gguf_file="m.gguf"), settings)
    assert "gguf_file" in errors[0]["msg"]


def test_syntax_checks_run_without_settings() -> None:
    # FastAPI validates the body without context first: syntax errors still surface there.
    with pytest.raises(ValidationError):
        JobCreate.model_validate(body(model="file:///etc/passwd"))
    # Context-dependent rules wait for the full validation.
    assert JobCreate.model_validate(body(model="hf:org/name")).model == "hf:org/name"


# -- settings --------------------------------------------------------------------------------


def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **extra: str) -> None:
    for key in list(os.environ):
        if key.startswith("LORP_"):
            monkeypatch.delenv(key)
    base = {
        "LORP_S3_ACCESS_KEY_ID": "ak",
        "LORP_S3_SECRET_ACCESS_KEY": "sk",
        "LORP_S3_BUCKET": "lorp-artifacts",
        "LORP_API_KEYS": json.dumps({"k" * 16: "acme"}),
        "LORP_LOCAL_ROOTS": json.dumps([str(tmp_path)]),
    }
    base.update(extra)
    for key, value in base.items():
        monkeypatch.setenv(key, value)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _env(monkeypatch, tmp_path, LORP_REDIS_URL="redis://h:1/2", LORP_ALLOW_HUB="true")
    s = Settings()  # type: ignore[call-arg]
    assert s.broker_url == "redis://h:1/2"  # broker defaults to the job store
    assert s.allow_hub is True and s.trust_remote_code is False
    assert s.presign_ttl_seconds == 3600 and s.visibility_timeout == 21600
    assert s.local_roots == [Path(os.path.realpath(tmp_path))]
    assert "k" * 16 not in repr(s) and "sk" not in repr(s.s3_secret_access_key)


@pytest.mark.parametrize(
    "extra",
    [
        {"LORP_API_KEYS": "{not json"},
        {"LORP_API_KEYS": "{}"},
        {"LORP_API_KEYS": json.dumps({"short": "acme"})},
        {"LORP_API_KEYS": json.dumps({"k" * 16: "bad/tenant"})},
        {"LORP_S3_ACCESS_KEY_ID": ""},
        {"LORP_S3_SECRET_ACCESS_KEY": "  "},
        {"LORP_LOCAL_ROOTS": json.dumps(["/does/not/exist"])},
        {"LORP_LOCAL_ROOTS": json.dumps(["relative/dir"])},
        {"LORP_CORPORA": json.dumps({"wiki": "/does/not/exist.txt"})},
        {"LORP_CORPORA": "[1, 2]"},
        {"LORP_REDIS_URL": "http://localhost:6379"},
        {"LORP_S3_ENDPOINT_URL": "localhost:8333"},
        {"LORP_S3_BUCKET": "Bad_Bucket"},
        {"LORP_PRESIGN_TTL_SECONDS": "0"},
        {"LORP_VISIBILITY_TIMEOUT": "10"},
        {"LORP_ALLOW_HUB": "maybe"},
    ],
)
def test_bad_settings_fail_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, extra: dict[str, str]
) -> None:
    _env(monkeypatch, tmp_path, **extra)
    with pytest.raises((ValidationError, SettingsError)):
        Settings()  # type: ignore[call-arg]


def test_missing_credentials_fail_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _env(monkeypatch, tmp_path)
    monkeypatch.delenv("LORP_S3_SECRET_ACCESS_KEY")
    with pytest.raises(ValidationError, match="s3_secret_access_key"):
        Settings()  # type: ignore[call-arg]


# -- summary -----------------------------------------------------------------------------------


def test_summary_from_report() -> None:
    report = {
        "summary": {
            "method": "lorp",
            "num_layers": 30,
            "removed": [6, 17, 27],
            "kept_layers": 27,
            "rls": 1.5,
            "num_clusters": 3,
            "speedups": {"prefill_b1_t512": 1.1, "decode_b1_p32_n128": 1.12},
            "weights_saved_bytes": 1000,
            "weights_saved_fraction": 0.08,
            "ppl_dense": 20.0,
            "ppl_pruned": 25.0,
            "ppl_ratio": 1.25,
        },
        "speed": [
            {"kind": "prefill", "speedup": 1.1},
            {"kind": "prefill", "speedup": 1.3},
            {"kind": "decode", "speedup": 1.12},
            {"kind": "decode", "speedup": None},
        ],
    }
    summary = JobSummary.model_validate(job_summary(report))
    assert summary.removed_blocks == [6, 17, 27] and summary.kept_layers == 27
    assert summary.prefill_speedup == pytest.approx(1.2)
    assert summary.decode_speedup == pytest.approx(1.12)
    assert summary.memory_reduction == 0.08
    assert (summary.perplexity_before, summary.perplexity_after) == (20.0, 25.0)
    empty = JobSummary.model_validate(job_summary({"summary": {}, "speed": []}))
    assert empty.removed_blocks == [] and empty.prefill_speedup is None


def test_download_targets_stay_in_the_directory(tmp_path: Path) -> None:
    from jobcore.errors import StorageError
    from jobcore.storage import safe_target

    root = tmp_path / "dl"
    root.mkdir()
    assert safe_target(root, "model/config.json") == root / "model" / "config.json"
    (root / "link").symlink_to(tmp_path)
    for rel in ("../evil", "a/../../evil", "/etc/passwd", "a//b", "./x", "link/evil", "a\\..\\b"):
        with pytest.raises(StorageError):
            safe_target(root, rel)


# -- methods, num_clusters rule and quality gate (issue 8) ------------------------------------


@pytest.mark.parametrize("method", method_names())
def test_every_library_method_is_accepted(settings: Settings, method: str) -> None:
    job = validate_job(body(method=method), settings, TENANT)
    assert job.method.value == method
    # round trip through the stored spec (what the worker reads back)
    assert JobCreate.model_validate(json.loads(job.fingerprint())).method.value == method
    config = PruneConfig(method=job.method.value, num_remove=2)
    assert config.method == method


def _methods_in_source() -> list[str]:
    """The method names of the files in ``lorp/methods/``, in ``order``, read from their text
    (ast), not through the registry the enum is built from: each public file assigns ``METHOD``
    a call (``MethodInfo(...)`` or ``replace(...)``) with ``name=`` (a literal or a module
    constant) and ``order=`` (a literal)."""
    found = []
    for path in sorted((ROOT / "lorp" / "methods").glob("*.py")):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants: dict[str, Any] = {}
        call = None
        for node in tree.body:
            if not isinstance(node, ast.Assign):
                continue
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant):
                    constants[target.id] = node.value.value
                if isinstance(target, ast.Name) and target.id == "METHOD":
                    call = node.value
        assert isinstance(call, ast.Call), f"{path.name}: METHOD is not assigned a call"
        keywords = {k.arg: k.value for k in call.keywords}
        name = keywords["name"]
        order = keywords["order"]
        assert isinstance(order, ast.Constant), path.name
        found.append(
            (
                order.value,
                constants[name.id] if isinstance(name, ast.Name) else ast.literal_eval(name),
            )
        )
    assert len(found) >= 8  # the shipped methods at least
    return [name for _, name in sorted(found)]


def test_method_enum_is_every_method_file_in_order() -> None:
    """The REST enum lists the methods of lorp/methods/ (read from the files, not the registry)
    in their order, and so does the OpenAPI schema."""
    expected = _methods_in_source()
    assert [m.value for m in Method] == expected
    schema = JobCreate.model_json_schema()
    assert schema["$defs"]["Method"]["enum"] == expected
    # the field's description names every method (it is built from the registry's records)
    description = schema["properties"]["method"]["description"]
    assert all(f"{name}: " in description for name in expected), description


@pytest.mark.parametrize("method", method_names())
def test_num_clusters_only_with_lorp_methods(settings: Settings, method: str) -> None:
    """The service applies the library's rule (PruneConfig) at submission, not in the worker."""
    data = body(method=method, num_clusters=2)
    try:
        PruneConfig(method=method, num_remove=2, num_clusters=2)
    except InvalidInputError:
        library_accepts = False
    else:
        library_accepts = True
    assert library_accepts == (method in ("lorp", "lorp-kl", "lorp-loss", "lorp-fold"))
    if library_accepts:
        assert validate_job(data, settings, TENANT).num_clusters == 2
    else:
        errors = errors_of(data, settings)
        assert "num_clusters only applies" in errors[0]["msg"]
        assert method in errors[0]["msg"]
    # without num_clusters every method is fine
    assert validate_job(body(method=method), settings, TENANT).num_clusters is None


def test_quality_gate_accepted_and_passed_to_the_library(settings: Settings) -> None:
    job = validate_job(
        body(method="auto", quality_gate={"max_ppl_ratio": 1.5, "min_top1_agreement": 0.8}),
        settings,
        TENANT,
    )
    assert job.quality_gate is not None
    assert job.quality_gate.model_dump() == {
        "max_ppl_ratio": 1.5,
        "max_kl": None,
        "min_top1_agreement": 0.8,
        "min_task_retention": None,
    }
    gate = QualityGate.from_dict(job.quality_gate.model_dump())
    assert gate.limits() == {"max_ppl_ratio": 1.5, "min_top1_agreement": 0.8}
    # integers are numbers too; the boundaries are allowed
    edge = validate_job(
        body(quality_gate={"max_ppl_ratio": 1, "max_kl": 0, "min_top1_agreement": 1}),
        settings,
        TENANT,
    )
    assert edge.quality_gate is not None and edge.quality_gate.max_ppl_ratio == 1.0
    assert validate_job(body(quality_gate=None), settings, TENANT).quality_gate is None


@pytest.mark.parametrize(
    ("gate", "needle"),
    [
        ({}, "at least one"),
        ({"max_ppl_ratio": None}, "at least one"),
        ({"max_ppl_ratio": 0.99}, "greater than or equal to 1"),
        ({"max_kl": -0.1}, "greater than or equal to 0"),
        ({"min_top1_agreement": 1.01}, "less than or equal to 1"),
        ({"min_top1_agreement": -0.5}, "greater than or equal to 0"),
        ({"max_kl": float("nan")}, "finite"),
        ({"max_ppl_ratio": float("inf")}, "finite"),
        ({"max_kl": "0.5"}, "valid number"),
        ({"max_kl": True}, "valid number"),
        ({"min_top1": 0.9}, "Extra inputs"),
        ({"max_kl": 0.5, "action": "warn"}, "Extra inputs"),
    ],
)
def test_bad_quality_gates(settings: Settings, gate: dict[str, Any], needle: str) -> None:
    errors = errors_of(body(quality_gate=gate), settings)
    assert field_of(errors) == {"quality_gate"}
    assert any(needle.lower() in e["msg"].lower() for e in errors), errors


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"holdout_windows": -1}, "holdout_windows"),
        ({"holdout_windows": 5000}, "holdout_windows"),
        ({"score_windows": 0}, "score_windows"),
        ({"score_windows": 1000}, "score_windows"),
        ({"score_seq_len": 1}, "score_seq_len"),
        ({"score_seq_len": 100_000}, "score_seq_len"),
        ({"search_candidates": 0}, "search_candidates"),
        ({"search_candidates": 100}, "search_candidates"),
        ({"search_candidates": 2.0}, "search_candidates"),
        ({"compensate": "yes"}, "compensate"),
        ({"compensate": 1}, "compensate"),
        ({"compensation_windows": 0}, "compensation_windows"),
        ({"compensation_windows": 2000}, "compensation_windows"),
        ({"compensation_tune_windows": -1}, "compensation_tune_windows"),
        ({"compensation_tune_windows": 2000}, "compensation_tune_windows"),
        ({"compensation_tune_windows": 1.5}, "compensation_tune_windows"),
        ({"temperature": "yes"}, "temperature"),
        ({"temperature": 1}, "temperature"),
        ({"temperature_windows": 0}, "temperature_windows"),
        ({"temperature_windows": 2000}, "temperature_windows"),
    ],
)
def test_bad_search_and_holdout_fields(
    settings: Settings, override: dict[str, Any], field: str
) -> None:
    assert field in field_of(errors_of(body(**override), settings))


def test_openapi_examples_validate() -> None:
    examples = JobCreate.model_config["json_schema_extra"]["examples"]  # type: ignore[index]
    assert any(e.get("method") == "auto" and e.get("quality_gate") for e in examples)
    assert any(e.get("compensate") is True and e.get("temperature") is True for e in examples)
    assert any(e.get("method") == "lorp-fold" for e in examples)
    for example in examples:
        JobCreate.model_validate(example)


def test_summary_carries_quality_and_refusal() -> None:
    gate = {
        "passed": False,
        "limits": {"min_top1_agreement": 0.999},
        "measured": {"top1_agreement": 0.61, "kl": 0.9},
        "violations": ["top-1 agreement 0.6100 < min 0.999"],
    }
    report = {
        "summary": {
            "method": "auto",
            "num_layers": 6,
            "removed": [2],
            "ppl_dense": 100.0,
            "ppl_pruned": 180.0,
            "ppl_ratio": 1.8,
            "status": "refused",
            "kl": 0.9,
            "top1_agreement": 0.61,
            "flags": ["mean KL(dense || pruned) 1.2 nats per token (flagged above 1)"],
            "quality_gate": gate,
        },
        "quality": {"gate": gate},
    }
    summary = JobSummary.model_validate(job_summary(report))
    assert summary.status == "refused"
    assert (summary.kl, summary.top1_agreement) == (0.9, 0.61)
    assert summary.flags == report["summary"]["flags"]
    assert summary.quality_gate == gate
    # an older report without these keys: gate from report["quality"], the rest empty
    legacy = JobSummary.model_validate(job_summary({"summary": {}, "quality": {"gate": gate}}))
    assert legacy.quality_gate == gate and legacy.flags == [] and legacy.kl is None


# -- admission control (issue 18 item 8) ---------------------------------------------------

AT_EVERY_CAP: dict[str, Any] = {
    "windows": 1024,
    "seq_len": 8192,
    "batch_size": 64,
    "eval_windows": 1024,
    "benchmark": {
        "prefill": [[64, 8192 - i] for i in range(8)],
        "decode": [[64, 8192 - i, 2048] for i in range(8)],
        "warmup": 20,
        "repetitions": 200,
    },
}


def test_estimated_tokens_by_stage(settings: Settings) -> None:
    job = validate_job(
        body(
            method="lorp-fold",
            windows=16,
            seq_len=128,
            evaluation="corpus:wiki",
            eval_windows=8,
            score_windows=4,
            score_seq_len=64,
            benchmark={"prefill": [[2, 16]], "decode": [[1, 8, 4]], "warmup": 1, "repetitions": 10},
        ),
        settings,
        TENANT,
    )
    # by hand: capture 16*128; 32 passes over 4x64; fold: (12 fit + 4*2 tune) + 4 temperature
    # windows of 128; dense + pruned over 8x128; benchmark 2*(1+10)*(2*16 + 1*(8+4))
    assert job.estimated_tokens() == {
        "calibration": 2048,
        "selection": 8192,
        "fits": 3072,
        "healing": 0,
        "depth_search": 0,
        "evaluation": 2048,
        "tasks": 0,
        "benchmark": 968,
        "total": 2048 + 8192 + 3072 + 2048 + 968,
    }
    # a quality target: the dense pass and NOMINAL_DEPTHS (8) depths over the 8 held-out
    # windows of 128, and a selection (32 passes over 4x64) per depth
    target = validate_job(
        body(
            method="lorp-fold",
            budget={"max_ppl_ratio": 1.5},
            seq_len=128,
            score_windows=4,
            score_seq_len=64,
        ),
        settings,
        TENANT,
    ).estimated_tokens()
    assert target["depth_search"] == 9 * 8 * 128 + 8 * 8192
    plain = validate_job(body(), settings, TENANT).estimated_tokens()
    assert plain["selection"] == plain["fits"] == plain["benchmark"] == 0
    assert plain["evaluation"] == 2 * 8 * 512  # the held-out calibration windows


@pytest.mark.parametrize(
    ("method", "selection", "fits"),
    [
        ("lorp", 0, 0),
        ("shortgpt", 0, 0),
        ("streamline", 0, 0),
        ("sleb", 32 * 8 * 512, 0),
        ("lorp-kl", 32 * 8 * 512, 0),
        ("lorp-loss", 32 * 8 * 512, 0),
        ("auto", 32 * 8 * 512, 0),
        ("lorp-fold", 32 * 8 * 512, (12 + 4 * 2 + 4) * 512),
    ],
)
def test_estimate_per_method_from_the_registry(
    settings: Settings, method: str, selection: int, fits: int
) -> None:
    """Which methods are charged scoring passes and fits (the registry's needs_model and fold
    flags, no longer lorp.search's lists): the same numbers as before, by hand."""
    cost = validate_job(body(method=method), settings, TENANT).estimated_tokens()
    assert (cost["selection"], cost["fits"]) == (selection, fits)


def test_nominal_scoring_covers_every_method_default() -> None:
    """Admission charges NOMINAL_SCORING windows when a job gives none: never fewer than the
    method will use."""
    for info in all_methods():
        windows, seq_len = selector(info.name).scoring_shape
        assert windows <= NOMINAL_SCORING[0] and seq_len <= NOMINAL_SCORING[1], info.name


# -- downstream tasks ------------------------------------------------------------------------


def test_task_names_are_the_librarys() -> None:
    from jobcore.spec import TASK_NAMES, TaskName
    from lorp.tasks import TASKS

    assert TASK_NAMES == TASKS and [t.value for t in TaskName] == list(TASKS)


def test_tasks_need_the_operators_task_data(settings: Settings, tmp_path: Path) -> None:
    """Without LORP_TASKS_DIR a job with tasks is refused at submission, saying why; with it,
    the worker's PruneConfig gets the folder (the job can't name one)."""
    errors = errors_of(body(tasks=["piqa"]), settings)
    assert len(errors) == 1
    assert "operator has not configured task data (LORP_TASKS_DIR)" in errors[0]["msg"]
    assert validate_job(body(), settings, TENANT).tasks == []  # no tasks: no task data needed
    data = tmp_path / "tasks"
    data.mkdir()
    with_data = settings.model_copy(update={"tasks_dir": data})
    job = validate_job(body(tasks=["piqa", "boolq"], task_limit=20), with_data, TENANT)
    from lorp.pipeline import PruneConfig

    config = job.prune_config(PruneConfig, with_data)
    assert (config.tasks, config.task_limit, config.task_data_dir) == (
        ("piqa", "boolq"),
        20,
        data,
    )
    assert job.prune_config(PruneConfig).task_data_dir is None  # no settings, no folder
    with pytest.raises(ValidationError, match="not an existing absolute directory"):
        Settings.model_validate({**settings.model_dump(), "tasks_dir": str(tmp_path / "nope")})


@pytest.mark.parametrize(
    ("overrides", "field", "text"),
    [
        ({"tasks": ["piqa", "mmlu"]}, "tasks", "hellaswag"),
        ({"tasks": ["piqa", "piqa"]}, "tasks", "must not repeat"),
        ({"tasks": "piqa"}, "tasks", "valid list"),
        ({"tasks": ["piqa"], "task_limit": 0}, "task_limit", "greater than or equal to 1"),
        ({"tasks": ["piqa"], "task_limit": 5001}, "task_limit", "less than or equal to 5000"),
        ({"quality_gate": {"min_task_retention": 0.9}}, "", "needs tasks"),
        ({"tasks": ["piqa"], "quality_gate": {"min_task_retention": 1.5}}, "quality_gate", "1"),
    ],
)
def test_bad_task_options_are_refused(
    settings: Settings, tmp_path: Path, overrides: dict[str, Any], field: str, text: str
) -> None:
    with_data = settings.model_copy(update={"tasks_dir": tmp_path})
    errors = errors_of(body(**overrides), with_data)
    assert field in field_of(errors), errors
    assert any(text in e["msg"] for e in errors), errors


def test_estimate_charges_task_items(settings: Settings, tmp_path: Path) -> None:
    from jobcore.spec import TASK_ITEM_TOKENS

    with_data = settings.model_copy(update={"tasks_dir": tmp_path})
    plain = validate_job(body(), with_data, TENANT).estimated_tokens()
    cost = validate_job(
        body(tasks=["hellaswag", "boolq", "piqa"], task_limit=100), with_data, TENANT
    ).estimated_tokens()
    # dense and pruned, 3 tasks x 100 items, TASK_ITEM_TOKENS positions an item
    assert cost["tasks"] == 2 * 3 * 100 * TASK_ITEM_TOKENS
    assert cost["total"] == plain["total"] + cost["tasks"]
    small = with_data.model_copy(update={"tenant_max_job_tokens": {TENANT: plain["total"] + 1}})
    (error,) = errors_of(body(tasks=["piqa"], task_limit=5), small)
    assert "job too costly" in error["msg"] and "tasks 4,000" in error["msg"]


def test_job_over_the_token_limit_is_refused_with_the_estimate(settings: Settings) -> None:
    errors = errors_of(body(**AT_EVERY_CAP), settings)
    assert len(errors) == 1 and errors[0]["loc"] == ()
    msg = errors[0]["msg"]
    assert "job too costly: about 4,159,303,680 token positions" in msg, msg
    assert "the limit for your tenant is 50,000,000" in msg
    # the operator's default admits a default job; a tenant may get its own limit
    small = settings.model_copy(update={"tenant_max_job_tokens": {TENANT: 10_000}})
    assert validate_job(body(windows=4, seq_len=256, holdout_windows=0), small, TENANT)
    assert "limit for your tenant is 10,000" in errors_of(body(), small)[0]["msg"]
    # without the operator's context (the worker re-reading a stored spec) nothing is refused
    assert JobCreate.model_validate(body(**AT_EVERY_CAP)).estimated_tokens()["total"] > 50_000_000
