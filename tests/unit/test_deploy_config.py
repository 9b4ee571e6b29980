"""docker-compose.yml, the Dockerfiles and the example config, checked against the settings class
(Docker itself can't run here)."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobcore.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
EXAMPLE_ENV = ROOT / "deploy" / "config.example.env"
LORP_SERVICES = ("api", "worker-cpu", "worker-gpu")
SETTINGS_NAMES = {f"LORP_{name.upper()}" for name in Settings.model_fields}
REQUIRED_NAMES = {
    f"LORP_{name.upper()}" for name, field in Settings.model_fields.items() if field.is_required()
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (single-quoted values verbatim), comments and blanks skipped."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default} and ${VAR:?error} against ``env``."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"{name} is required: {arg}")
        return ""

    return _VAR.sub(sub, value)


def test_expected_services(compose: dict[str, Any]) -> None:
    assert set(services(compose)) >= {
        "redis",
        "minio",
        "createbuckets",
        "api",
        "worker-cpu",
        "worker-gpu",
    }


def test_redis_persists_with_aof(compose: dict[str, Any]) -> None:
    redis = services(compose)["redis"]
    cmd = redis["command"]
    args = cmd if isinstance(cmd, list) else shlex.split(cmd)
    assert args[0] == "redis-server"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-data" in compose["volumes"]


def test_ports(compose: dict[str, Any]) -> None:
    svc = services(compose)

    def container_ports(name: str) -> set[int]:
        return {int(str(p).split("#")[0].strip().rsplit(":", 1)[-1]) for p in svc[name]["ports"]}

    assert 8000 in container_ports("api")
    assert 9000 in container_ports("minio")
    assert "ports" not in svc["redis"], "redis should not be published outside the network"
    api_cmd = svc["api"]["command"]
    assert api_cmd[:3] == ["python", "-m", "service.serve"]
    assert api_cmd[api_cmd.index("--port") + 1] == "8000"


def test_api_image_runs_the_compose_command(compose: dict[str, Any]) -> None:
    """The Dockerfile's CMD and the compose command start the API the same way."""
    dockerfile = (ROOT / "deploy" / "Dockerfile.api").read_text()
    cmd = next(line for line in dockerfile.splitlines() if line.startswith("CMD "))
    assert json.loads(cmd[4:]) == services(compose)["api"]["command"]


@pytest.mark.parametrize("name", LORP_SERVICES)
def test_env_names_are_settings_fields(compose: dict[str, Any], name: str) -> None:
    env = services(compose)[name]["environment"]
    lorp_names = {k for k in env if k.startswith("LORP_")}
    unknown = lorp_names - SETTINGS_NAMES
    assert not unknown, f"{name}: not Settings fields: {sorted(unknown)}"
    missing = REQUIRED_NAMES - lorp_names
    assert not missing, f"{name}: required settings missing: {sorted(missing)}"


def test_api_and_workers_share_one_configuration(compose: dict[str, Any]) -> None:
    def lorp_env(name: str) -> dict[str, str]:
        env = services(compose)[name]["environment"]
        return {k: v for k, v in env.items() if k.startswith("LORP_")}

    assert lorp_env("api") == lorp_env("worker-cpu") == lorp_env("worker-gpu")


def test_compose_env_with_example_config_is_valid(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The api's environment, interpolated with deploy/config.example.env, builds Settings."""
    example = parse_env_file(EXAMPLE_ENV)
    env = {
        k: interpolate(str(v), example) for k, v in services(compose)["api"]["environment"].items()
    }
    env["LORP_LOCAL_ROOTS"] = f'["{tmp_path}"]'  # /models only exists inside the containers
    for key in list(os.environ):
        if key.startswith("LORP_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # type: ignore[call-arg]
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.redis_url.startswith("redis://redis:6379")
    assert settings.api_keys == {
        "change-me-key-for-acme-0001": "acme",
        "change-me-key-for-beta-0002": "beta",
    }
    assert settings.visibility_timeout >= 3600


def test_secrets_are_required_not_defaulted(compose: dict[str, Any]) -> None:
    env = services(compose)["api"]["environment"]
    for name in ("LORP_S3_ACCESS_KEY_ID", "LORP_S3_SECRET_ACCESS_KEY", "LORP_API_KEYS"):
        with pytest.raises(KeyError, match="required"):
            interpolate(env[name], {})


def test_example_env_names_are_settings_fields() -> None:
    names = set(re.findall(r"^#?\s*(LORP_[A-Z0-9_]+)=", EXAMPLE_ENV.read_text(), re.M))
    assert names, "no LORP_ settings in the example"
    assert names <= SETTINGS_NAMES, sorted(names - SETTINGS_NAMES)
    assert set(parse_env_file(EXAMPLE_ENV)) >= REQUIRED_NAMES


def test_minio_credentials_match_the_service(compose: dict[str, Any]) -> None:
    svc = services(compose)
    api_env = svc["api"]["environment"]
    minio_env = svc["minio"]["environment"]
    assert minio_env["MINIO_ROOT_USER"].startswith("${LORP_S3_ACCESS_KEY_ID")
    assert minio_env["MINIO_ROOT_PASSWORD"].startswith("${LORP_S3_SECRET_ACCESS_KEY")
    assert api_env["LORP_S3_ACCESS_KEY_ID"].startswith("${LORP_S3_ACCESS_KEY_ID")
    buckets = svc["createbuckets"]
    assert buckets["image"].startswith("minio/mc")
    assert buckets["environment"]["ARTIFACT_BUCKET"].startswith("${LORP_S3_BUCKET")
    assert "mc mb" in " ".join(buckets["entrypoint"])
    for name in LORP_SERVICES:
        deps = svc[name]["depends_on"]
        assert deps["createbuckets"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"


def test_workers_run_one_prefork_job_on_their_device_class_queue(compose: dict[str, Any]) -> None:
    from jobcore.config import Settings

    defaults = {name: f.default for name, f in Settings.model_fields.items()}
    for name, queue in (("worker-cpu", "cpu_queue"), ("worker-gpu", "gpu_queue")):
        cmd = services(compose)[name]["command"]
        assert cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
        assert cmd[cmd.index("--pool") + 1] == "prefork"
        assert cmd[cmd.index("--concurrency") + 1] == "1"
        assert cmd[cmd.index("-Q") + 1].split(",") == [defaults[queue]]


def test_housekeeper_posts_webhooks_with_one_beat(compose: dict[str, Any]) -> None:
    from jobcore.webhooks import WEBHOOK_QUEUE

    svc = services(compose)["housekeeper"]
    cmd = svc["command"]
    assert cmd[:4] == ["celery", "-A", "worker.housekeeper", "worker"]
    assert cmd[cmd.index("-Q") + 1] == WEBHOOK_QUEUE
    assert "--beat" in cmd  # the sweep; the service is not meant to be scaled
    assert svc["image"] == services(compose)["worker-cpu"]["image"]
    env = svc["environment"]
    assert {k: v for k, v in env.items() if k.startswith("LORP_")} == {
        k: v for k, v in services(compose)["api"]["environment"].items() if k.startswith("LORP_")
    }


def test_flower_watches_the_broker_the_services_use(compose: dict[str, Any]) -> None:
    svc = services(compose)
    flower = svc["flower"]
    assert flower["profiles"] == ["monitoring"]
    broker = next(a for a in flower["command"] if a.startswith("--broker="))
    assert broker == "--broker=" + svc["api"]["environment"]["LORP_BROKER_URL"]
    assert all(str(p).startswith("127.0.0.1:") for p in flower["ports"])  # never published


def test_grafana_dashboard_is_valid_json_with_prometheus_panels() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "lorp-dashboard.json").read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
    assert all("lorp_" in t["expr"] for p in dashboard["panels"] for t in p["targets"])


def test_gpu_worker_profile_reserves_an_nvidia_device(compose: dict[str, Any]) -> None:
    svc = services(compose)
    gpu = svc["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name in ("api", "worker-cpu", "redis", "minio"):
        assert "profiles" not in svc[name], f"{name} must start without a profile"


def test_long_running_services_have_healthchecks(compose: dict[str, Any]) -> None:
    for name in ("redis", "minio", "api", "worker-cpu", "worker-gpu"):
        test = services(compose)[name]["healthcheck"]["test"]
        assert test and test[0] in ("CMD", "CMD-SHELL")


def _dockerfiles(compose: dict[str, Any]) -> dict[str, Path]:
    out = {}
    for name, svc in services(compose).items():
        build = svc.get("build")
        if build:
            out[name] = ROOT / build.get("context", ".") / build["dockerfile"]
    return out


API_DOCKERFILE = ROOT / "deploy" / "Dockerfile.api"
API_REQUIREMENTS = ROOT / "deploy" / "requirements-api.txt"
WORKER_DOCKERFILES = (
    ROOT / "deploy" / "Dockerfile.worker",
    ROOT / "deploy" / "Dockerfile.worker-cuda",
)
#: Packages of pyproject's ``service`` extra the API process does not need, and why.
NOT_IN_API = {"httpx": "the lorp-jobs client's HTTP library; the API never imports it"}
#: The library's dependencies: none may reach the API image.
LIBRARY_ONLY = (
    "torch",
    "transformers",
    "numpy",
    "scikit-learn",
    "safetensors",
    "gguf",
    "accelerate",
    "matplotlib",
)


def _installs(path: Path) -> list[str]:
    """The ``pip install`` commands of a Dockerfile (continuation lines joined)."""
    text = path.read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if "pip install" in line]


def _copied(path: Path) -> set[str]:
    return {
        src.rstrip("/")
        for line in path.read_text().splitlines()
        if line.startswith("COPY ")
        for src in line.split()[1:-1]
    }


def _requirement_names(lines: list[str]) -> dict[str, str]:
    """Normalised distribution name -> the requirement as written."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0]
            out[re.sub(r"[-_.]+", "-", name).lower()] = line.replace(" ", "")
    return out


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_referenced_dockerfiles_exist_and_pin_torch(compose: dict[str, Any]) -> None:
    dockerfiles = _dockerfiles(compose)
    assert set(dockerfiles) == set(LORP_SERVICES)
    all_files = set(dockerfiles.values()) | set((ROOT / "deploy").glob("Dockerfile*"))
    assert all_files == {API_DOCKERFILE, *WORKER_DOCKERFILES}
    for path in WORKER_DOCKERFILES:
        assert path.is_file(), f"missing {path}"
        installs = _installs(path)
        torch_installs = [line for line in installs if re.search(r"\btorch\b", line)]
        assert torch_installs, f"{path.name}: torch must be installed explicitly (pinned) first"
        for line in torch_installs:
            assert '"torch==2.13.0"' in line or "torch==2.13.0" in line.split(), line
        first_project = next(i for i, line in enumerate(installs) if ".[service]" in line)
        assert installs.index(torch_installs[0]) < first_project, f"{path.name}: torch first"
    cpu = (ROOT / "deploy" / "Dockerfile.worker").read_text()
    assert "download.pytorch.org/whl/cpu" in cpu


def test_api_image_installs_no_torch() -> None:
    """The API image installs the project without its dependencies plus the API's own list;
    nothing there names the library's dependencies or pulls them through an extra."""
    installs = _installs(API_DOCKERFILE)
    assert installs, "Dockerfile.api installs nothing"
    for line in installs:
        args = shlex.split(line.split("pip install", 1)[1].split("&&", 1)[0])
        if "-r" in args:
            assert args == ["-r", "requirements-api.txt"], line
        else:
            assert args == ["--no-deps", "."], f"the project must be installed --no-deps: {line}"
        assert not any(re.search(rf"\b{dep}\b", line) for dep in LIBRARY_ONLY), line
    assert "COPY deploy/requirements-api.txt ./" in API_DOCKERFILE.read_text()
    names = _requirement_names(API_REQUIREMENTS.read_text().splitlines())
    assert names and not set(names) & set(LIBRARY_ONLY), names


def test_api_requirements_are_the_service_extra_minus_the_client() -> None:
    extra = _requirement_names(_pyproject()["project"]["optional-dependencies"]["service"])
    api = _requirement_names(API_REQUIREMENTS.read_text().splitlines())
    assert set(NOT_IN_API) <= set(extra)
    assert api == {k: v for k, v in extra.items() if k not in NOT_IN_API}


def test_api_requirements_cover_what_the_api_imports() -> None:
    """Every third-party package imported by the API's code (service/ but its client, jobcore/,
    and the lorp modules it may use) comes with deploy/requirements-api.txt: it is one of them or
    one of their dependencies (installed metadata, extras and markers followed)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    def closure(requirements: list[str]) -> set[str]:
        seen: set[str] = set()
        todo = [(Requirement(r), "") for r in requirements]
        while todo:
            req, extra = todo.pop()
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            for wanted in req.extras or {""}:
                key = f"{name}[{wanted}]"
                if key in seen:
                    continue
                seen.add(key)
                for sub in metadata.requires(name) or []:
                    todo.append((Requirement(sub), wanted))
        return {k.split("[")[0] for k in seen}

    lines = [line.split("#", 1)[0].strip() for line in API_REQUIREMENTS.read_text().splitlines()]
    installed = closure([line for line in lines if line])
    files = [
        *(p for p in (ROOT / "service").rglob("*.py") if not p.name.startswith("client")),
        *(ROOT / "jobcore").rglob("*.py"),
        *(ROOT / "lorp" / "methods").rglob("*.py"),
        *(ROOT / "lorp" / n for n in ("__init__.py", "errors.py", "paths.py", "progress.py")),
    ]
    own = {"lorp", "jobcore", "service", "worker", "devstack", "tests"}
    top_level: set[str] = set()
    for path in files:
        tree = ast.parse(path.read_text())
        # the library's files: what importing them runs (a method's select imports torch when
        # called, never in the API); the API's own files: every import but typing-only ones
        nodes = tree.body if path.is_relative_to(ROOT / "lorp") else list(ast.walk(tree))
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        for node in nodes:
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                top_level |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top_level.add(node.module.split(".")[0])
    third_party = sorted(top_level - own - set(sys.stdlib_module_names))
    assert "fastapi" in third_party and "torch" not in third_party, third_party
    distributions = metadata.packages_distributions()
    missing = [
        module
        for module in third_party
        if not {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(module, [])}
        & installed
    ]
    assert not missing, f"imported by the API but not installed in its image: {missing}"


@pytest.mark.parametrize("path", [API_DOCKERFILE, *WORKER_DOCKERFILES], ids=lambda p: p.name)
def test_images_copy_their_packages(path: Path) -> None:
    """The API image holds lorp, jobcore and service; a worker image lorp, jobcore and worker:
    neither carries the other's package, nor the dev stack."""
    copied = _copied(path)
    assert {"lorp", "jobcore"} <= copied, copied
    assert "devstack" not in copied
    if path == API_DOCKERFILE:
        assert "service" in copied and "worker" not in copied, copied
    else:
        assert "worker" in copied and "service" not in copied, copied


def test_dockerfiles_copy_only_existing_paths(compose: dict[str, Any]) -> None:
    for path in _dockerfiles(compose).values():
        for line in path.read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    if src == "README.md" and not (ROOT / src).exists():
                        pytest.fail("README.md (pyproject's readme) is missing at the repo root")
                    assert (ROOT / src).exists(), f"{path.name}: COPY source {src} missing"
