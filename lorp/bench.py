"""Latency, throughput and memory of an original model vs its pruned view, measured fairly, in
a time budget, with a confidence interval for every speedup.

Both models live in one process and share every kept block: the pruned model is the original
seen through :func:`lorp.surgery.pruned_view` (the removed blocks are taken out of the forward
graph, the config and attention ``layer_idx`` are fixed, and everything is restored on exit). No
second copy is loaded, and timed runs alternate between the two in A/B pairs (original-pruned,
pruned-original, ...) so that machine noise hits both alike.

Workloads
    prefill (batch, prompt_len): one forward of a random prompt with ``use_cache=True`` up to
        the first token's logits and its greedy choice -- time to first token.
    decode (batch, prompt_len, new_tokens): after an untimed prefill, ``new_tokens`` greedy
        steps with the KV cache, each feeding one token per sequence (our own loop, no
        ``generate()``, so no EOS early stop or sampling logic is timed) -- tokens/s. Batch 1 is
        latency; :data:`SERVING_DECODE` (batch 16 and 64, 128 new tokens, as SLEB reports) is
        serving throughput (``lorp bench --serving``).

Modes (which engine produced each number: :data:`ENGINES`)
    eager: transformers eager, dynamic KV cache (every workload).
    compiled: decode only -- a static KV cache (``transformers.StaticCache``) and
        ``torch.compile`` of the model's forward (mode ``"reduce-overhead"`` on CUDA: CUDA
        graphs; inductor's default on CPU, which needs a C compiler). The prompt is prefilled
        eagerly into the static cache; the timed greedy steps run the compiled graph. The first
        run of each model compiles: its time is reported (``compile_s``) and charged to the
        budget, never timed. Where compiling fails (no C compiler, an architecture the static
        cache or the compiler can't take) the row's ``status`` is ``"unavailable"`` with the
        reason. ``modes=None`` (the default) runs eager everywhere and compiled on CUDA only:
        inductor compiling a model on a few CPU cores costs more than a job's benchmark budget;
        ask for it with ``modes=("eager", "compiled")``. torch.compile's caches are cleared when
        the compiled runs end (they hold the model), so a long-lived worker does not grow.

Time budget and stopping rule (:mod:`lorp.benchstats`)
    The benchmark gets ``budget_s`` seconds (the pipeline's default: ``budget_fraction`` of the
    job's other stages; :data:`DEFAULT_BUDGET_S` alone). Each (workload, mode) gets an equal
    share of what is left when it starts, its memory/warm-up runs, block timings and
    compilation included, then runs A/B pairs until the 95% interval of its speedup is within
    ``target_half_width`` (±2%), its share is spent, or ``repetitions`` pairs ran; at least
    ``min_repetitions`` pairs always run, so a budget too small for them is overrun (``budget``
    says so); a row that would start with the budget already spent is not run (``status``
    "unavailable", ``unavailable_reason`` "skipped: ..."), except the first. A row is
    ``reliable: false`` with its reasons when the interval is wider than
    ``unreliable_half_width`` (±5%) or the machine's load changed (or was busy) while it ran
    (:func:`lorp.benchstats.load_changes`).

Memory (per workload, mode and model, from one dedicated untimed run, which is also the first
warm-up run; after compilation in the compiled mode)
    weight_bytes      exact bytes of the unique parameter and buffer storages of the model as it
                      runs (the pruned view counts only kept modules; tied embeddings once).
    kv_cache_bytes    exact bytes of the tensors in the KV cache at the end of the run (the
                      static cache is allocated for prompt + new tokens up front).
    CPU: ``peak_rss_bytes`` is the process's peak resident set (VmHWM) during the run, after it
        was reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs`` (Linux). It
        is the whole process, so it contains the weights of *all* blocks even for the pruned
        view. ``peak_rss_delta_bytes`` = peak minus the RSS just before the run: the run's
        working memory (activations, KV cache, temporaries). ``estimated_peak_bytes`` =
        weight_bytes + peak_rss_delta_bytes: the peak a process holding only this model would
        add on top of the interpreter and libraries. Before each memory run we collect garbage
        and call glibc ``malloc_trim(0)`` so memory freed earlier is not hidden in the
        baseline. Where the peak cannot be reset, ``rss_peak_reset`` is False and the numbers
        are the RSS growth seen after the run instead (a lower bound).
    CUDA: ``max_memory_allocated_bytes`` / ``max_memory_reserved_bytes`` after
        ``reset_peak_memory_stats`` (and ``empty_cache``) before the run.
    Serving (``BenchmarkResult.serving_memory``): weights + KV cache of both models at the
        eager workload with the most cached tokens (batch x (prompt + new tokens)).

Ideal speedup
    With ``measure_blocks`` every block of the original model is timed during extra eager
    full-model runs of each workload (forward pre-/post-hooks with ``time.perf_counter``; CUDA
    synchronises in the hooks), median per block. ideal = T / (T - sum of the removed blocks'
    times), where T is the hooked run's total time, and ``measured_over_ideal`` = speedup /
    ideal (its interval: the speedup's, divided by the ideal). Hooks can't time the inside of a
    compiled graph, so the compiled mode's ideal comes from the eager block fractions of the
    same workload (``ideal_source``): the removed blocks' share of the eager step, which
    assumes the compiled step spends the same share of its time in those blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import inspect
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._blocks import locate_blocks
from ._forward import input_device
from .benchstats import (
    LoadSample,
    Sampling,
    SpeedupInterval,
    StoppingRule,
    assess,
    load_changes,
    read_load,
    sample_pairs,
)
from .errors import InvalidInputError, LorpError
from .progress import ProgressCallback
from .surgery import pruned_view, validate_removed

STAGE = "benchmark"
#: Fewest A/B pairs per workload and mode (fewer only with ``allow_few_repetitions``, for tests).
MIN_REPETITIONS = 3
ORIGINAL = "original"
PRUNED = "pruned"
EAGER = "eager"
COMPILED = "compiled"
MODES = (EAGER, COMPILED)
#: The budget of a benchmark run alone (``lorp bench``); the pipeline's is a share of the job.
DEFAULT_BUDGET_S = 60.0
#: Serving-shaped decode workloads: batch 16 and 64, 128 new tokens (as SLEB reports).
SERVING_DECODE: tuple[tuple[int, int, int], ...] = ((16, 32, 128), (64, 32, 128))

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def engine(mode: str, device: torch.device | str) -> str:
    """Which engine and mode produced a number, in words."""
    if mode == EAGER:
        return "transformers eager (dynamic KV cache)"
    if torch.device(device).type == "cuda":
        return 'transformers + torch.compile "reduce-overhead" (CUDA graphs), static KV cache'
    return "transformers + torch.compile (inductor default), static KV cache"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to measure, and for how long.

    prefill: grid of (batch, prompt_len) workloads (time to first token).
    decode: (batch, prompt_len, new_tokens) workloads (tokens/s with the KV cache); add
        :data:`SERVING_DECODE` for serving throughput.
    modes: "eager" and/or "compiled" (decode only); None: eager, plus compiled on CUDA.
    warmup: untimed runs per model before the timed pairs, the first of them the memory run
        (there is always that one).
    repetitions: most A/B pairs per workload and mode.
    min_repetitions: fewest pairs (at least :data:`MIN_REPETITIONS` unless
        ``allow_few_repetitions``, which exists for tests and also lowers it to
        ``repetitions`` when that is smaller).
    target_half_width: stop once the speedup's 95% interval is within this (0.02: ±2%).
    unreliable_half_width: wider than this, the row is marked unreliable.
    budget_s: seconds for the whole benchmark; None: the caller's default (the pipeline:
        ``budget_fraction`` of the job's other stages; :func:`benchmark` alone:
        :data:`DEFAULT_BUDGET_S`).
    budget_fraction: the pipeline's default budget as a share of the other stages' time.
    measure_blocks: time every block to report the ideal speedup.
    block_repetitions: hooked full-model runs per workload for the block timings (one: a
        decode run already sums every block over all its steps, and the budget is better spent
        on pairs).
    order: "alternate" (counterbalanced pairs AB, BA, AB, ...) or "random" (each pair's order
        drawn with ``seed``).
    seed: seed of the random prompts, of the "random" order and of the bootstrap.
    """

    prefill: tuple[tuple[int, int], ...] = ((1, 512),)
    decode: tuple[tuple[int, int, int], ...] = ((1, 32, 16),)
    modes: tuple[str, ...] | None = None
    warmup: int = 1
    repetitions: int = 20
    min_repetitions: int = MIN_REPETITIONS
    target_half_width: float = 0.02
    unreliable_half_width: float = 0.05
    budget_s: float | None = None
    budget_fraction: float = 0.25
    measure_blocks: bool = True
    block_repetitions: int = 1
    order: str = "alternate"
    seed: int = 0
    allow_few_repetitions: bool = False

    def __post_init__(self) -> None:
        prefill = _int_tuples(self.prefill, 2, "prefill")
        decode = _int_tuples(self.decode, 3, "decode")
        object.__setattr__(self, "prefill", prefill)
        object.__setattr__(self, "decode", decode)
        if not prefill and not decode:
            raise InvalidInputError("benchmark needs at least one prefill or decode workload")
        for batch, prompt_len in prefill:
            if batch < 1 or prompt_len < 1:
                raise InvalidInputError(
                    f"prefill workload ({batch}, {prompt_len}): batch and prompt_len must be >= 1"
                )
        for batch, prompt_len, new_tokens in decode:
            if batch < 1 or prompt_len < 1 or new_tokens < 1:
                raise InvalidInputError(
                    f"decode workload ({batch}, {prompt_len}, {new_tokens}): batch, prompt_len "
                    "and new_tokens must be >= 1"
                )
        if len(set(prefill)) != len(prefill) or len(set(decode)) != len(decode):
            raise InvalidInputError("benchmark workloads must not repeat")
        if self.modes is not None:
            if isinstance(self.modes, (str, bytes)) or not isinstance(self.modes, Sequence):
                raise InvalidInputError("modes must be a list of 'eager' and/or 'compiled'")
            modes = tuple(self.modes)
            bad = [m for m in modes if m not in MODES]
            if bad or not modes or len(set(modes)) != len(modes):
                raise InvalidInputError(
                    f"modes must be distinct values of {', '.join(MODES)}, got {list(modes)!r}"
                )
            if modes == (COMPILED,) and not decode:
                raise InvalidInputError("the compiled mode times decode workloads: give one")
            object.__setattr__(self, "modes", modes)
        for name in ("warmup", "repetitions", "min_repetitions", "block_repetitions", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInputError(f"{name} must be an integer, got {value!r}")
        if self.warmup < 0:
            raise InvalidInputError(f"warmup must be >= 0, got {self.warmup}")
        if self.allow_few_repetitions and self.repetitions < self.min_repetitions:
            object.__setattr__(self, "min_repetitions", self.repetitions)  # tests: few runs
        if self.min_repetitions < 1:
            raise InvalidInputError(f"min_repetitions must be >= 1, got {self.min_repetitions}")
        if self.min_repetitions < MIN_REPETITIONS and not self.allow_few_repetitions:
            raise InvalidInputError(
                f"min_repetitions must be >= {MIN_REPETITIONS} for an interval worth the name, "
                f"got {self.min_repetitions}"
            )
        if self.repetitions < self.min_repetitions:
            raise InvalidInputError(
                f"repetitions (most pairs, {self.repetitions}) must be >= min_repetitions "
                f"({self.min_repetitions})"
            )
        if self.block_repetitions < 1:
            raise InvalidInputError(f"block_repetitions must be >= 1, got {self.block_repetitions}")
        for name in ("target_half_width", "unreliable_half_width", "budget_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise InvalidInputError(f"{name} must be a number in (0, 1], got {value!r}")
        if self.budget_s is not None and (
            isinstance(self.budget_s, bool)
            or not isinstance(self.budget_s, (int, float))
            or not 0 < self.budget_s < math.inf
        ):
            raise InvalidInputError(f"budget_s must be a positive number, got {self.budget_s!r}")
        if self.order not in ("alternate", "random"):
            raise InvalidInputError(f"order must be 'alternate' or 'random', got {self.order!r}")
        for name in ("measure_blocks", "allow_few_repetitions"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be a boolean")

    def modes_for(self, device: torch.device | str) -> tuple[str, ...]:
        """The modes run on ``device`` (``modes``, or eager plus compiled on CUDA)."""
        if self.modes is not None:
            return tuple(self.modes)
        return MODES if torch.device(device).type == "cuda" else (EAGER,)

    def rule(self) -> StoppingRule:
        return StoppingRule(
            target=float(self.target_half_width),
            unreliable=float(self.unreliable_half_width),
            min_pairs=self.min_repetitions,
            max_pairs=self.repetitions,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prefill"] = [list(w) for w in self.prefill]
        data["decode"] = [list(w) for w in self.decode]
        data["modes"] = None if self.modes is None else list(self.modes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchmarkConfig:
        if not isinstance(data, dict):
            raise InvalidInputError("benchmark config must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown benchmark config field(s): {', '.join(unknown)}")
        return cls(**data)


def _int_tuples(value: Any, width: int, name: str) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidInputError(f"{name} must be a list of {width}-element integer lists")
    out = []
    for item in value:
        if (
            isinstance(item, (str, bytes))
            or not isinstance(item, Sequence)
            or len(item) != width
            or any(isinstance(v, bool) or not isinstance(v, int) for v in item)
        ):
            raise InvalidInputError(f"{name} workload {item!r} must be a list of {width} integers")
        out.append(tuple(int(v) for v in item))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class RunStats:
    """Timed repetitions of one model on one workload."""

    times_s: list[float]
    tokens: int  # tokens produced (decode) or consumed (prefill) per run
    memory: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**summarize(self.times_s, self.tokens), "memory": self.memory}


@dataclass
class WorkloadResult:
    """One workload in one mode. ``name`` is the workload's (``prefill_b1_t512``), with
    ``_compiled`` appended in the compiled mode; ``workload`` the workload's alone.

    ``status``: "measured", or "unavailable" (``unavailable_reason``; no times)."""

    name: str
    kind: str  # "prefill" | "decode"
    batch: int
    prompt_len: int
    new_tokens: int | None
    original: RunStats | None
    pruned: RunStats | None
    schedule: list[str]  # the order in which the timed runs happened
    block_times_s: list[float] | None = None  # median time of every block (original, eager)
    hooked_total_s: float | None = None
    mode: str = EAGER
    engine: str = ""
    workload: str = ""
    status: str = "measured"
    unavailable_reason: str | None = None
    interval: SpeedupInterval | None = None
    stop_reason: str | None = None
    load: dict[str, Any] = field(default_factory=dict)
    unreliable_reasons: list[str] = field(default_factory=list)
    compile_s: dict[str, float] | None = None  # first (compiling) run of each model
    time_s: float = 0.0  # everything this row cost: memory, warm-up, blocks, compile, pairs
    share_s: float | None = None  # its share of the budget when it started

    @property
    def speedup(self) -> float:
        if self.original is None or self.pruned is None:
            return math.nan
        pruned = _median(self.pruned.times_s)
        return _median(self.original.times_s) / pruned if pruned > 0 else math.inf

    @property
    def reliable(self) -> bool | None:
        return None if self.status != "measured" else not self.unreliable_reasons

    def ideal_speedup(self, removed: Sequence[int]) -> float | None:
        if self.block_times_s is None or self.hooked_total_s is None:
            return None
        rest = self.hooked_total_s - sum(self.block_times_s[i] for i in removed)
        return self.hooked_total_s / rest if rest > 0 else None

    def to_dict(self, removed: Sequence[int]) -> dict[str, Any]:
        ideal = self.ideal_speedup(removed)
        speedup: float | None = self.speedup
        if speedup is not None and not math.isfinite(speedup):
            speedup = None  # unavailable, or a zero median: JSON has no NaN
        removed_time = (
            None
            if self.block_times_s is None
            else float(sum(self.block_times_s[i] for i in removed))
        )
        ci = None if self.interval is None else self.interval.to_dict()
        ratio_ci = None
        if ci is not None and ideal and ci["low"] is not None and ci["high"] is not None:
            ratio_ci = {"low": ci["low"] / ideal, "high": ci["high"] / ideal}
        if ideal is None:
            ideal_source = None
        elif self.mode == EAGER:
            ideal_source = "block hooks on the eager original model"
        else:
            ideal_source = (
                "eager block fractions of the same workload (hooks can't time a compiled graph)"
            )
        return {
            "name": self.name,
            "workload": self.workload or self.name,
            "kind": self.kind,
            "mode": self.mode,
            "engine": self.engine,
            "status": self.status,
            "unavailable_reason": self.unavailable_reason,
            "batch": self.batch,
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "metric": "time_to_first_token_s" if self.kind == "prefill" else "decode_time_s",
            "original": None if self.original is None else self.original.to_dict(),
            "pruned": None if self.pruned is None else self.pruned.to_dict(),
            "speedup": speedup,
            "speedup_ci": ci,
            "ideal_speedup": ideal,
            "ideal_source": ideal_source,
            "measured_over_ideal": None if ideal is None or speedup is None else speedup / ideal,
            "measured_over_ideal_ci": ratio_ci,
            "reliable": self.reliable,
            "unreliable_reasons": list(self.unreliable_reasons),
            "stop_reason": self.stop_reason,
            "load": dict(self.load),
            "compile_s": None if self.compile_s is None else dict(self.compile_s),
            "time_s": self.time_s,
            "share_s": self.share_s,
            "block_times_s": self.block_times_s,
            "hooked_total_s": self.hooked_total_s,
            "removed_blocks_time_s": removed_time,
            "schedule": list(self.schedule),
        }


@dataclass
class BenchmarkResult:
    config: BenchmarkConfig
    removed: list[int]
    num_layers: int
    device: str
    dtype: str
    weights: dict[str, int | float]
    workloads: list[WorkloadResult]
    memory_method: dict[str, Any]
    environment: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    total_time_s: float = 0.0
    budget: dict[str, Any] = field(default_factory=dict)
    modes: list[str] = field(default_factory=lambda: [EAGER])

    def workload(self, name: str) -> WorkloadResult:
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(name)

    def serving_memory(self) -> dict[str, Any] | None:
        """Weights + KV cache of both models at the measured eager workload with the most
        cached tokens (batch x (prompt + new tokens)): the memory a server saves."""
        rows = [
            w
            for w in self.workloads
            if w.mode == EAGER and w.original is not None and w.pruned is not None
        ]
        if not rows:
            return None
        w = max(rows, key=lambda r: (r.batch * (r.prompt_len + (r.new_tokens or 0)), r.name))
        assert w.original is not None and w.pruned is not None
        kv_o = int(w.original.memory.get("kv_cache_bytes") or 0)
        kv_p = int(w.pruned.memory.get("kv_cache_bytes") or 0)
        total_o = int(self.weights["original_bytes"]) + kv_o
        total_p = int(self.weights["pruned_bytes"]) + kv_p
        return {
            "workload": w.name,
            "batch": w.batch,
            "context_tokens": w.prompt_len + (w.new_tokens or 0),
            "kv_cache_original_bytes": kv_o,
            "kv_cache_pruned_bytes": kv_p,
            "original_bytes": total_o,
            "pruned_bytes": total_p,
            "saved_bytes": total_o - total_p,
            "saved_fraction": (total_o - total_p) / total_o if total_o else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "removed": list(self.removed),
            "num_layers": self.num_layers,
            "kept_layers": self.num_layers - len(self.removed),
            "device": self.device,
            "dtype": self.dtype,
            "modes": list(self.modes),
            "weights": dict(self.weights),
            "serving_memory": self.serving_memory(),
            "memory_method": dict(self.memory_method),
            "environment": dict(self.environment),
            "workloads": [w.to_dict(self.removed) for w in self.workloads],
            "budget": dict(self.budget),
            "notes": list(self.notes),
            "total_time_s": self.total_time_s,
        }


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def summarize(times_s: Sequence[float], tokens: int) -> dict[str, Any]:
    """Median, p10/p25/p75/p90, min, max and the raw times; tokens/s from the median."""
    t = np.asarray(times_s, dtype=np.float64)
    p10, p25, p50, p75, p90 = (float(v) for v in np.percentile(t, [10, 25, 50, 75, 90]))
    return {
        "times_s": [float(v) for v in t],
        "repetitions": len(t),
        "median_s": p50,
        "p10_s": p10,
        "p25_s": p25,
        "p75_s": p75,
        "p90_s": p90,
        "iqr_s": p75 - p25,
        "min_s": float(t.min()),
        "max_s": float(t.max()),
        "tokens": tokens,
        "tokens_per_s": tokens / p50 if p50 > 0 else None,
    }


# --------------------------------------------------------------------------------------------
# Environment and memory helpers


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions and hardware: python, torch, transformers, numpy, platform, CPU/GPU name."""
    import transformers

    dev = torch.device(device) if device is not None else None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_bytes(model: nn.Module) -> int:
    """Exact bytes of the unique parameter and buffer storages of ``model`` as it is now.

    Shared storages (tied embeddings, views) are counted once.
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for t in tensors:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def cache_bytes(cache: Any) -> int:
    """Exact bytes of all tensors held by a transformers KV cache (or nested tuples of tensors)."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def visit(obj: Any, depth: int) -> None:
        nonlocal total
        if depth > 6 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            if obj.numel() == 0:
                return
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
            for item in vars(obj).values():
                visit(item, depth + 1)

    visit(cache, 0)
    return total


def _status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", _PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_peak_rss() -> bool:
    try:
        _PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _MemoryProbe:
    """Peak memory of one run: CUDA allocator stats or the process's VmHWM on Linux."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset_ok: bool | None = None
        self.before: int | None = None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        _malloc_trim()
        self.before = _status_kib("VmRSS")
        self.reset_ok = _reset_peak_rss()
        if self.reset_ok:
            # The reset sets VmHWM to the current RSS; if it did not, do not trust it.
            hwm = _status_kib("VmHWM")
            if hwm is None or self.before is None or hwm > self.before + (1 << 20):
                self.reset_ok = False

    def stop(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {
                "baseline_allocated_bytes": self.before,
                "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                "max_memory_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            }
        peak = _status_kib("VmHWM" if self.reset_ok else "VmRSS")
        delta = None if peak is None or self.before is None else max(0, peak - self.before)
        return {
            "rss_baseline_bytes": self.before,
            "peak_rss_bytes": peak,
            "peak_rss_delta_bytes": delta,
            "rss_peak_reset": bool(self.reset_ok),
        }


def memory_method(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "kind": "cuda",
            "description": (
                "torch.cuda max_memory_allocated / max_memory_reserved of one dedicated run "
                "after empty_cache + reset_peak_memory_stats; weight and KV-cache bytes exact."
            ),
            "rss_peak_reset": None,
        }
    probe = _MemoryProbe(device)
    probe.start()
    reset = bool(probe.reset_ok)
    if reset:
        desc = (
            "peak_rss_bytes: process VmHWM during one dedicated run, reset to the current RSS "
            "via /proc/self/clear_refs before it; it includes the weights of all blocks (both "
            "models share one process). peak_rss_delta_bytes: peak minus RSS before the run "
            "(activations, KV cache, temporaries). estimated_peak_bytes: weight_bytes + "
            "peak_rss_delta_bytes. weight_bytes and kv_cache_bytes are exact tensor sizes."
        )
    else:
        desc = (
            "the peak RSS could not be reset on this system: peak_rss_bytes is the RSS right "
            "after the run and peak_rss_delta_bytes its growth during the run (a lower bound of "
            "the run's working memory). weight_bytes and kv_cache_bytes are exact."
        )
    return {"kind": "cpu_rss", "description": desc, "rss_peak_reset": reset}


# --------------------------------------------------------------------------------------------
# The runs


@contextlib.contextmanager
def _variant(model: nn.Module, removed: Sequence[int], which: str) -> Iterator[None]:
    if which == ORIGINAL:
        yield
        return
    with pruned_view(model, removed):
        yield


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _vocab_size(model: nn.Module) -> int:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        return int(emb.num_embeddings)
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    raise InvalidInputError("cannot determine the model's vocabulary size")


class _Runner:
    """Eager runs (dynamic KV cache)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.timer = _Timer(device)
        params = inspect.signature(model.forward).parameters
        self.logits_to_keep = "logits_to_keep" in params
        # transformers >= 5.24 names the KV cache ``cache`` (``past_key_values`` is deprecated)
        self.cache_name = "cache" if "cache" in params else "past_key_values"

    def kwargs(self, ids: torch.Tensor, cache: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
        if cache is not None:
            kwargs[self.cache_name] = cache
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return kwargs

    def _forward(self, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(**self.kwargs(ids, cache))
        return out.logits[:, -1, :], getattr(out, self.cache_name)

    def prefill(self, ids: torch.Tensor) -> tuple[float, Any]:
        """Time to first token: prompt forward with a fresh cache + greedy choice."""
        start = self.timer.now()
        logits, cache = self._forward(ids, None)
        logits.argmax(dim=-1)
        elapsed = self.timer.now() - start
        return elapsed, cache

    def decode(self, ids: torch.Tensor, new_tokens: int) -> tuple[float, Any]:
        """Untimed prefill, then ``new_tokens`` timed greedy steps with the KV cache."""
        logits, cache = self._forward(ids, None)
        token = logits.argmax(dim=-1, keepdim=True)
        start = self.timer.now()
        for _ in range(new_tokens):
            logits, cache = self._forward(token, cache)
            token = logits.argmax(dim=-1, keepdim=True)
        elapsed = self.timer.now() - start
        return elapsed, cache


class _CompiledDecode:
    """Decode with a static KV cache and a compiled forward (one cache per model, reset
    between runs, so CUDA graphs see the same addresses)."""

    def __init__(self, runner: _Runner, step: Callable[..., Any]) -> None:
        self.runner = runner
        self.step = step
        self.caches: dict[str, Any] = {}
        self.last_tokens: torch.Tensor | None = None

    def decode(self, ids: torch.Tensor, new_tokens: int, which: str) -> tuple[float, Any]:
        from transformers import StaticCache

        runner = self.runner
        model = runner.model
        prompt_len = int(ids.shape[1])
        cache = self.caches.get(which)
        if cache is None:  # built under the model's view: the pruned one has fewer layers
            config: Any = model.config
            cache = StaticCache(config=config, max_cache_len=prompt_len + new_tokens)
            self.caches[which] = cache
        else:
            cache.reset()
        device = runner.device
        out = model(  # the prompt, eagerly (untimed)
            **runner.kwargs(ids, cache), cache_position=torch.arange(prompt_len, device=device)
        )
        token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        positions = [torch.tensor([prompt_len + i], device=device) for i in range(new_tokens)]
        tokens = [token]
        start = runner.timer.now()
        for pos in positions:
            if runner.timer.cuda:
                torch.compiler.cudagraph_mark_step_begin()
            out = self.step(**runner.kwargs(token, cache), cache_position=pos)
            token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            tokens.append(token)
        elapsed = runner.timer.now() - start
        self.last_tokens = torch.cat(tokens, dim=1)
        return elapsed, cache


def compiled_mode_unavailable(device: torch.device | str) -> str | None:
    """Why the compiled mode can't run here (None: it may; compiling can still fail)."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if torch.device(device).type == "cpu" and not (shutil.which("g++") or shutil.which("gcc")):
        return "torch.compile's inductor needs a C/C++ compiler (g++ or gcc) and none is installed"
    return None


def _compile_step(model: nn.Module, device: torch.device) -> Callable[..., Any]:
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(model.forward, mode=mode, dynamic=False)


def _failure(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"compiling failed: {type(exc).__name__}: {first}".rstrip(": ")


@contextlib.contextmanager
def _block_hooks(blocks: nn.ModuleList, timer: _Timer, totals: list[float]) -> Iterator[None]:
    starts: list[float] = [0.0] * len(blocks)
    handles = []

    def pre(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            starts[i] = timer.now()

        return hook

    def post(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            totals[i] += timer.now() - starts[i]

        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre(i)))
            handles.append(block.register_forward_hook(post(i)))
        yield
    finally:
        for h in handles:
            h.remove()


def _pair_order(index: int, order: str, rng: np.random.Generator) -> tuple[str, str]:
    first_original = index % 2 == 0 if order == "alternate" else bool(rng.integers(0, 2))
    return (ORIGINAL, PRUNED) if first_original else (PRUNED, ORIGINAL)


def _schedule(pairs: int, order: str, seed: int) -> list[str]:
    """The run order of ``pairs`` A/B pairs (what :func:`benchmark` follows)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for i in range(pairs):
        out += list(_pair_order(i, order, rng))
    return out


def _gpu_others(device: torch.device) -> tuple[int, ...] | None:
    """Pids of the other processes on ``device``'s GPU (None: not known)."""
    if device.type != "cuda":
        return None
    try:
        text = torch.cuda.list_gpu_processes(device)
    except Exception:  # pynvml/amdsmi missing or failing: not known
        text = ""
    pids = re.findall(r"process\s+(\d+)\s+uses", text)
    if not pids and "not found" in text.lower() and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        pids = re.findall(r"\d+", out)
    elif not pids and "no processes" not in text.lower():
        return None
    return tuple(sorted(int(p) for p in pids if int(p) != os.getpid()))


@dataclass(frozen=True)
class _Task:
    name: str
    workload: str
    kind: str
    batch: int
    prompt_len: int
    new_tokens: int | None
    mode: str
    seed: int

    @property
    def shape(self) -> tuple[str, int, int, int | None]:
        return (self.kind, self.batch, self.prompt_len, self.new_tokens)


def _tasks(config: BenchmarkConfig, modes: Sequence[str]) -> list[_Task]:
    """Eager rows first (every workload), then the compiled decode rows."""
    base = [
        (f"prefill_b{b}_t{t}", "prefill", b, t, None, i) for i, (b, t) in enumerate(config.prefill)
    ] + [
        (f"decode_b{b}_p{t}_n{n}", "decode", b, t, n, len(config.prefill) + i)
        for i, (b, t, n) in enumerate(config.decode)
    ]
    out = []
    if EAGER in modes:
        out += [_Task(name, name, k, b, t, n, EAGER, s) for name, k, b, t, n, s in base]
    if COMPILED in modes:
        out += [
            _Task(f"{name}_compiled", name, k, b, t, n, COMPILED, s)
            for name, k, b, t, n, s in base
            if k == "decode"
        ]
    return out


class _Session:
    """One benchmark run: the model, the budget clock, progress, block timings per shape."""

    def __init__(
        self,
        model: nn.Module,
        removed: list[int],
        config: BenchmarkConfig,
        budget_s: float,
        progress: ProgressCallback | None,
    ) -> None:
        self.model = model
        self.removed = removed
        self.config = config
        self.budget_s = budget_s
        self.progress = progress
        self.loc = locate_blocks(model)
        self.device = input_device(model)
        self.runner = _Runner(model, self.device)
        self.vocab = _vocab_size(model)
        self.started = time.perf_counter()
        self.last_fraction = 0.0
        self.blocks: dict[tuple[str, int, int, int | None], tuple[list[float], float]] = {}
        self.step: Callable[..., Any] | None = None
        self.weights: dict[str, int] = {}
        self._last_schedule: list[str] = []

    def clock(self) -> float:
        return time.perf_counter()

    def spent(self) -> float:
        return self.clock() - self.started

    def report(self, message: str) -> None:
        fraction = max(self.last_fraction, min(0.99, self.spent() / self.budget_s))
        self.last_fraction = fraction
        if self.progress is not None:
            self.progress(STAGE, fraction, message)

    def ids(self, task: _Task) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.config.seed + task.seed)
        ids = torch.randint(0, self.vocab, (task.batch, task.prompt_len), generator=gen)
        return ids.to(self.device)

    def eager_run(self, task: _Task, ids: torch.Tensor, which: str) -> tuple[float, Any]:
        with _variant(self.model, self.removed, which):
            if task.kind == "prefill":
                return self.runner.prefill(ids)
            assert task.new_tokens is not None
            return self.runner.decode(ids, task.new_tokens)

    def block_times(self, task: _Task, ids: torch.Tensor) -> tuple[list[float], float]:
        """Median block times and total of hooked eager runs of the original (per shape)."""
        if task.shape in self.blocks:
            return self.blocks[task.shape]
        per_rep: list[list[float]] = []
        totals: list[float] = []
        reps = self.config.block_repetitions
        for r in range(reps):
            acc = [0.0] * len(self.loc.blocks)
            with _block_hooks(self.loc.blocks, self.runner.timer, acc):
                elapsed, cache = self.eager_run(task, ids, ORIGINAL)
            del cache
            per_rep.append(acc)
            totals.append(elapsed)
            self.report(f"{task.name}: block timings {r + 1}/{reps}")
        arr = np.asarray(per_rep, dtype=np.float64)
        found = ([float(v) for v in np.median(arr, axis=0)], _median(totals))
        self.blocks[task.shape] = found
        return found

    def measure(self, task: _Task, share: float) -> WorkloadResult:
        start = self.clock()
        deadline = start + share
        ids = self.ids(task)
        result = self._row(task, share_s=share)
        run: Callable[[str], tuple[float, Any]]
        if task.mode == EAGER:

            def run(which: str) -> tuple[float, Any]:
                return self.eager_run(task, ids, which)

        else:
            reason = compiled_mode_unavailable(self.device)
            if reason is None:
                try:
                    run, result.compile_s = self._compile(task, ids)
                except LorpError:
                    raise
                except Exception as exc:  # any compiler failure is reported, never a crash
                    reason = _failure(exc)
            if reason is not None:
                result.status = "unavailable"
                result.unavailable_reason = reason
                result.time_s = self.clock() - start
                self.report(f"{task.name}: unavailable ({reason})")
                return result
            self.report(f"{task.name}: compiled in {sum((result.compile_s or {}).values()):.1f} s")
        memory = self._untimed(task, run)
        if self.config.measure_blocks:
            result.block_times_s, result.hooked_total_s = self.block_times(task, ids)
        sampling, load = self._pairs(task, run, deadline)
        tokens = task.batch * (
            task.prompt_len if task.kind == "prefill" else (task.new_tokens or 0)
        )
        result.original = RunStats(sampling.original, tokens, memory[ORIGINAL])
        result.pruned = RunStats(sampling.pruned, tokens, memory[PRUNED])
        result.schedule = self._last_schedule
        result.interval = sampling.interval
        result.stop_reason = sampling.stop_reason
        result.load = load
        result.unreliable_reasons = assess(sampling.interval, load, self.config.rule())
        result.time_s = self.clock() - start
        return result

    def skipped(self, task: _Task, budget: float) -> WorkloadResult:
        """A row not run: the budget was spent before it started."""
        reason = (
            f"skipped: the benchmark's time budget ({budget:.1f} s) was spent before this "
            "workload started"
        )
        self.report(f"{task.name}: {reason}")
        return self._row(task, status="unavailable", unavailable_reason=reason, share_s=0.0)

    def _row(self, task: _Task, **fields: Any) -> WorkloadResult:
        """An empty result row of ``task`` (its identity, engine and mode), with ``fields``."""
        return WorkloadResult(
            name=task.name,
            kind=task.kind,
            batch=task.batch,
            prompt_len=task.prompt_len,
            new_tokens=task.new_tokens,
            original=None,
            pruned=None,
            schedule=[],
            mode=task.mode,
            engine=engine(task.mode, self.device),
            workload=task.workload,
            **fields,
        )

    def _compile(
        self, task: _Task, ids: torch.Tensor
    ) -> tuple[Callable[[str], tuple[float, Any]], dict[str, float]]:
        if self.step is None:
            self.step = _compile_step(self.model, self.device)
        decoder = _CompiledDecode(self.runner, self.step)
        assert task.new_tokens is not None
        new_tokens = task.new_tokens

        def run(which: str) -> tuple[float, Any]:
            with _variant(self.model, self.removed, which):
                return decoder.decode(ids, new_tokens, which)

        compile_s = {}
        for which in (ORIGINAL, PRUNED):
            t = self.clock()
            _, cache = run(which)
            del cache
            compile_s[which] = self.clock() - t
        return run, compile_s

    def _untimed(
        self, task: _Task, run: Callable[[str], tuple[float, Any]]
    ) -> dict[str, dict[str, Any]]:
        """Warm-up runs, alternated; the last of each model's is its memory run."""
        memory: dict[str, dict[str, Any]] = {}
        runs = max(1, self.config.warmup)
        for i in range(runs):
            for which in (ORIGINAL, PRUNED) if i % 2 == 0 else (PRUNED, ORIGINAL):
                if i < runs - 1:
                    _, cache = run(which)
                    del cache
                    self.report(f"{task.name}: warm-up {i + 1}/{runs} ({which})")
                    continue
                probe = _MemoryProbe(self.device)
                probe.start()
                _, cache = run(which)
                mem = probe.stop()
                weight = self.weights[which]
                kv = cache_bytes(cache)
                del cache
                mem = {"weight_bytes": weight, "kv_cache_bytes": kv, **mem}
                if mem.get("peak_rss_delta_bytes") is not None:
                    mem["estimated_peak_bytes"] = weight + mem["peak_rss_delta_bytes"]
                memory[which] = mem
                self.report(f"{task.name}: memory of the {which} model")
        return memory

    def _pairs(
        self, task: _Task, run: Callable[[str], tuple[float, Any]], deadline: float
    ) -> tuple[Sampling, dict[str, Any]]:
        rng = np.random.default_rng(self.config.seed + task.seed)
        schedule: list[str] = []
        samples: list[LoadSample] = [read_load(self.clock(), _gpu_others(self.device))]

        def run_pair(i: int) -> tuple[float, float]:
            times: dict[str, float] = {}
            for which in _pair_order(i, self.config.order, rng):
                elapsed, cache = run(which)
                del cache
                times[which] = elapsed
                schedule.append(which)
            samples.append(read_load(self.clock()))
            o, p = times[ORIGINAL], times[PRUNED]
            self.report(
                f"{task.name}: pair {i + 1} original {o * 1e3:.1f} ms, pruned {p * 1e3:.1f} ms"
            )
            return o, p

        sampling = sample_pairs(run_pair, self.config.rule(), deadline, self.clock)
        end = samples[-1]
        samples[-1] = LoadSample(**{**asdict(end), "gpu_others": _gpu_others(self.device)})
        threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        self._last_schedule = schedule
        return sampling, load_changes(samples, own_threads=threads)


def benchmark(
    model: nn.Module,
    removed: Sequence[int],
    config: BenchmarkConfig | None = None,
    progress: ProgressCallback | None = None,
    *,
    budget_s: float | None = None,
    budget_source: str | None = None,
) -> BenchmarkResult:
    """Measure ``model`` and its pruned view (``removed`` blocks taken out) in one process.

    ``budget_s`` (seconds; else ``config.budget_s``, else :data:`DEFAULT_BUDGET_S`) bounds the
    whole run as the module docstring says; ``budget_source`` says in the result where that
    number came from. The model is left exactly as it was (blocks, config, training mode).
    """
    config = config or BenchmarkConfig()
    loc = locate_blocks(model)
    num_layers = len(loc.blocks)
    removed_sorted = validate_removed(num_layers, removed)
    if budget_s is not None and not (0 < budget_s < math.inf):
        raise InvalidInputError(f"budget_s must be a positive number, got {budget_s!r}")
    if budget_s is None:
        budget = config.budget_s if config.budget_s is not None else DEFAULT_BUDGET_S
        source = "budget_s" if config.budget_s is not None else "default"
    else:
        budget, source = float(budget_s), budget_source or "budget_s"
    session = _Session(model, removed_sorted, config, float(budget), progress)
    device = session.device
    dtype = _model_dtype(model)
    modes = config.modes_for(device)
    notes: list[str] = []
    if not session.runner.logits_to_keep:
        notes.append("the model has no logits_to_keep: prefill computes logits for every token")
    if config.modes is None and device.type != "cuda":
        notes.append(
            "compiled mode not run: on CPU it is asked for explicitly (modes eager,compiled), "
            "since inductor compiling on a few cores costs more than the default budget"
        )
    tasks = _tasks(config, modes)
    if not tasks:
        raise InvalidInputError("the compiled mode times decode workloads: give one")

    was_training = model.training
    model.eval()
    results: list[WorkloadResult] = []
    try:
        with torch.inference_mode():
            session.weights[ORIGINAL] = model_bytes(model)
            with _variant(model, removed_sorted, PRUNED):
                session.weights[PRUNED] = model_bytes(model)
            session.report(f"{len(tasks)} workloads in a budget of {budget:.0f} s")
            mem_method = memory_method(device)
            for i, task in enumerate(tasks):
                left = budget - session.spent()
                if i > 0 and left <= 0:  # the first row always runs
                    results.append(session.skipped(task, budget))
                    continue
                results.append(session.measure(task, left / (len(tasks) - i)))
    finally:
        model.train(was_training)
        if session.step is not None:
            session.step = None
            torch._dynamo.reset()  # the compiled graphs hold the model

    weights_original, weights_pruned = session.weights[ORIGINAL], session.weights[PRUNED]
    removed_block_bytes = weights_original - weights_pruned
    weights: dict[str, int | float] = {
        "original_bytes": weights_original,
        "pruned_bytes": weights_pruned,
        "saved_bytes": removed_block_bytes,
        "saved_fraction": removed_block_bytes / weights_original if weights_original else 0.0,
    }
    total = session.spent()
    if session.progress is not None:
        session.progress(STAGE, 1.0, f"done in {total:.1f} s")
    if any(w.status == "measured" and not math.isfinite(w.speedup) for w in results):
        notes.append("a speedup is not finite (a zero median time)")
    exceeded = total > budget
    if exceeded:
        notes.append(
            f"the benchmark took {total:.1f} s, over its budget of {budget:.1f} s: every row it "
            f"runs times at least {config.min_repetitions} pairs"
        )
    return BenchmarkResult(
        config=config,
        removed=removed_sorted,
        num_layers=num_layers,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        weights=weights,
        workloads=results,
        memory_method=mem_method,
        environment=environment_info(device),
        notes=notes,
        total_time_s=total,
        budget={"budget_s": budget, "source": source, "spent_s": total, "exceeded": exceeded},
        modes=list(modes),
    )
