"""Who may import whom (issue 19), read from the source: every ``import`` / ``from ... import``
of every ``.py`` file under ``lorp/``, ``jobcore/``, ``service/``, ``worker/`` and ``devstack/``
(module level, function level and ``TYPE_CHECKING`` blocks alike; relative imports resolved;
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name too), and the API
process itself: importing it loads no torch, numpy, transformers or scikit-learn.

    lorp      the library: imports none of jobcore, service, worker, devstack, nor the
              service's packages (fastapi, celery, redis, boto3)
    jobcore   the job core: no service, worker, devstack, fastapi, nothing heavy; from lorp only
              the registry (lorp.methods), lorp.paths, lorp.errors and lorp.progress
    service   the API and its client: no worker, devstack, nothing heavy; from lorp the same
              three modules
    worker    the Celery worker: no service, devstack, fastapi
    devstack  the local process stack: none of lorp, jobcore, service, worker (it starts them
              as processes)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lorp", "jobcore", "service", "worker", "devstack")
#: The library's heavy dependencies: never in the API process (nor in jobcore).
HEAVY = (
    "torch",
    "transformers",
    "numpy",
    "sklearn",
    "scipy",
    "safetensors",
    "gguf",
    "accelerate",
    "matplotlib",
)
#: What the API process and the job core may use of the library (none of it loads torch).
LIGHT_LORP = ("lorp.methods", "lorp.paths", "lorp.errors", "lorp.progress")


@dataclass(frozen=True)
class Rule:
    """``package`` must not import a module under any of ``forbidden`` unless it is under one
    of ``allowed``."""

    package: str
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()


RULES = (
    Rule(
        "lorp", ("jobcore", "service", "worker", "devstack", "fastapi", "celery", "redis", "boto3")
    ),
    Rule("jobcore", ("service", "worker", "devstack", "fastapi", *HEAVY, "lorp"), LIGHT_LORP),
    Rule("service", ("worker", "devstack", *HEAVY, "lorp"), LIGHT_LORP),
    Rule("worker", ("service", "devstack", "fastapi")),
    Rule("devstack", ("lorp", "jobcore", "service", "worker")),
)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in ``source`` of ``module``: ``import a.b`` gives
    ``a.b``; ``from a import b, c`` gives ``a.b`` and ``a.c`` (``b`` may be a module or a
    name: either way it comes from ``a``); relative imports are resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            for alias in node.names:
                yield node.lineno, origin if alias.name == "*" else f"{origin}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            yield node.lineno, node.args[0].value


def violations(rule: Rule, source: str, module: str, is_package: bool = False) -> list[str]:
    return [
        f"line {line}: {name}"
        for line, name in imports_of(source, module, is_package)
        if _under(name, rule.forbidden) and not _under(name, rule.allowed)
    ]


@pytest.mark.parametrize("rule", RULES, ids=[r.package for r in RULES])
def test_package_imports_only_what_it_may(rule: Rule) -> None:
    files = sorted((ROOT / rule.package).rglob("*.py"))
    assert files, f"no sources under {rule.package}/"
    found = []
    for path in files:
        bad = violations(
            rule, path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py"
        )
        found += [f"{path.relative_to(ROOT)} {v}" for v in bad]
    assert not found, f"{rule.package} must not import these:\n" + "\n".join(found)


def test_every_package_has_a_rule() -> None:
    assert {r.package for r in RULES} == set(PACKAGES)
    for name in PACKAGES:
        assert (ROOT / name / "__init__.py").is_file(), name


# -- the checker itself: every forbidden name of every rule is caught -------------------------


@pytest.mark.parametrize("rule", RULES, ids=[r.package for r in RULES])
def test_every_rule_catches_a_real_violation(rule: Rule) -> None:
    """Each forbidden package, imported in each way a file can, is reported; what ``allowed``
    names is not. (The tree-wide test above passing means nothing if these would not fail.)"""
    module = f"{rule.package}.probe"
    for forbidden in rule.forbidden:
        forms = [
            f"import {forbidden}",
            f"import {forbidden}.sub as x",
            f"from {forbidden} import thing",
            f"from {forbidden}.deep.er import thing",
            f"def f():\n    from {forbidden}.deep import thing\n",
            f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import {forbidden}\n",
            f"import importlib\nimportlib.import_module({forbidden!r})",
            f"__import__({forbidden!r})",
        ]
        for source in forms:
            assert violations(rule, source, module), (rule.package, source)
    for allowed in rule.allowed:
        assert not violations(rule, f"from {allowed} import x\nimport {allowed}", module)


def test_relative_imports_are_resolved() -> None:
    """A relative import names a module of the importing package (it can't leave it)."""

    def names(source: str, module: str, is_package: bool = False) -> list[str]:
        return [name for _, name in imports_of(source, module, is_package)]

    assert names("from ..errors import LorpError", "lorp.methods.sleb") == ["lorp.errors.LorpError"]
    assert names("from . import x, y", "lorp.methods", is_package=True) == [
        "lorp.methods.x",
        "lorp.methods.y",
    ]
    assert names("from .deps import StoreDep", "service.routes.jobs") == [
        "service.routes.deps.StoreDep"
    ]
    assert names("from ..deps import *", "service.routes.jobs") == ["service.deps"]


# -- the API process ----------------------------------------------------------------------------


def _fresh(code: str, tmp_path: Path) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_importing_the_api_loads_no_torch(tmp_path: Path) -> None:
    """``import service.main`` in a fresh interpreter: none of the library's heavy packages."""
    heavy = _fresh(
        f"""
        import json, sys
        import service.main
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
        """,
        tmp_path,
    )
    assert heavy == []


def test_the_api_request_path_loads_no_torch(tmp_path: Path) -> None:
    """Building the app and validating a job of every method against a local model (the
    registry, the URI and confinement checks, admission control), the response models, the
    queue message and the ``lorp-jobs`` client: still none of them."""
    heavy = _fresh(
        f"""
        import json, os, sys
        from pathlib import Path
        root = Path({str(tmp_path)!r}) / "root"
        (root / "model").mkdir(parents=True)
        (root / "model" / "model.safetensors").write_bytes(b"0" * 8)
        (root / "calib.txt").write_text("text")
        from jobcore.config import Settings
        from jobcore.queue import make_celery, run_job_message
        from jobcore.routing import choose_queue, job_weight_bytes
        from jobcore.spec import Method, validate_job
        from service.main import create_app
        from service.schemas import JobPublic
        import service.client_cli
        settings = Settings(
            s3_access_key_id="ak", s3_secret_access_key="sk", s3_bucket="lorp-artifacts",
            api_keys={{"k" * 16: "acme"}}, local_roots=[root],
        )
        create_app(settings)
        for method in Method:
            job = validate_job(
                {{"model": str(root / "model"), "calibration": str(root / "calib.txt"),
                  "method": method.value, "budget": {{"blocks": 1}}}},
                settings, "acme",
            )
            job.estimated_tokens()
            choose_queue(job.device, job_weight_bytes(job, None), {{"cpu": 1 << 30}}, settings)
        run_job_message(make_celery(settings), "0" * 32, settings.cpu_queue)
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
        """,
        tmp_path,
    )
    assert heavy == []
