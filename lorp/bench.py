"""Latency, throughput and memory of an original model vs its pruned view, measured fairly.

Both models live in one process and share every kept block: the pruned model is the original
seen through :func:`lorp.surgery.pruned_view` (the removed blocks are taken out of the forward
graph, the config and attention ``layer_idx`` are fixed, and everything is restored on exit). No
second copy is loaded, and timed repetitions alternate between the two in counterbalanced pairs
(original-pruned, pruned-original, ...) so that machine noise hits both alike.

Workloads
    prefill (batch, prompt_len): one forward of a random prompt with ``use_cache=True`` up to
        the first token's logits and its greedy choice -- time to first token.
    decode (batch, prompt_len, new_tokens): after an untimed prefill, ``new_tokens`` greedy
        steps with the KV cache, each feeding one token per sequence (our own loop, no
        ``generate()``, so no EOS early stop or sampling logic is timed) -- tokens/s.

Memory (per workload and model, from one dedicated untimed run after the timed ones)
    weight_bytes      exact bytes of the unique parameter and buffer storages of the model as it
                      runs (the pruned view counts only kept modules; tied embeddings once).
    kv_cache_bytes    exact bytes of the tensors in the KV cache at the end of the run.
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

Ideal speedup
    With ``measure_blocks`` every block of the original model is timed during extra full-model
    runs of each workload (forward pre-/post-hooks with ``time.perf_counter``; CUDA synchronises
    in the hooks), median per block. ideal = T / (T - sum of the removed blocks' times), where T
    is the hooked run's total time, and ``measured_over_ideal`` = speedup / ideal.
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
from .errors import InvalidInputError
from .progress import ProgressCallback
from .surgery import pruned_view, validate_removed

STAGE = "benchmark"
MIN_REPETITIONS = 10
ORIGINAL = "original"
PRUNED = "pruned"

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to measure.

    prefill: grid of (batch, prompt_len) workloads (time to first token).
    decode: (batch, prompt_len, new_tokens) workloads (tokens/s with the KV cache).
    warmup: untimed runs per model and workload before the timed ones.
    repetitions: timed runs per model and workload (at least 10 unless
        ``allow_few_repetitions``, which exists for tests).
    measure_blocks: time every block to report the ideal speedup.
    block_repetitions: hooked full-model runs per workload for the block timings.
    order: "alternate" (counterbalanced pairs AB, BA, AB, ...) or "random" (each pair's order
        drawn with ``seed``).
    seed: seed of the random prompts and of the "random" order.
    """

    prefill: tuple[tuple[int, int], ...] = ((1, 512), (8, 128))
    decode: tuple[tuple[int, int, int], ...] = ((1, 32, 128),)
    warmup: int = 2
    repetitions: int = 10
    measure_blocks: bool = True
    block_repetitions: int = 3
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
        for name in ("warmup", "repetitions", "block_repetitions", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInputError(f"{name} must be an integer, got {value!r}")
        if self.warmup < 0:
            raise InvalidInputError(f"warmup must be >= 0, got {self.warmup}")
        if self.repetitions < 1:
            raise InvalidInputError(f"repetitions must be >= 1, got {self.repetitions}")
        if self.repetitions < MIN_REPETITIONS and not self.allow_few_repetitions:
            raise InvalidInputError(
                f"repetitions must be >= {MIN_REPETITIONS} for a fair median and spread, "
                f"got {self.repetitions}"
            )
        if self.block_repetitions < 1:
            raise InvalidInputError(f"block_repetitions must be >= 1, got {self.block_repetitions}")
        if self.order not in ("alternate", "random"):
            raise InvalidInputError(f"order must be 'alternate' or 'random', got {self.order!r}")
        for name in ("measure_blocks", "allow_few_repetitions"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be a boolean")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prefill"] = [list(w) for w in self.prefill]
        data["decode"] = [list(w) for w in self.decode]
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
    name: str
    kind: str  # "prefill" | "decode"
    batch: int
    prompt_len: int
    new_tokens: int | None
    original: RunStats
    pruned: RunStats
    schedule: list[str]  # the order in which the timed runs happened
    block_times_s: list[float] | None = None  # median time of every block (original model)
    hooked_total_s: float | None = None

    @property
    def speedup(self) -> float:
        pruned = _median(self.pruned.times_s)
        return _median(self.original.times_s) / pruned if pruned > 0 else math.inf

    def ideal_speedup(self, removed: Sequence[int]) -> float | None:
        if self.block_times_s is None or self.hooked_total_s is None:
            return None
        rest = self.hooked_total_s - sum(self.block_times_s[i] for i in removed)
        return self.hooked_total_s / rest if rest > 0 else None

    def to_dict(self, removed: Sequence[int]) -> dict[str, Any]:
        ideal = self.ideal_speedup(removed)
        speedup = self.speedup
        removed_time = (
            None
            if self.block_times_s is None
            else float(sum(self.block_times_s[i] for i in removed))
        )
        return {
            "name": self.name,
            "kind": self.kind,
            "batch": self.batch,
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "metric": "time_to_first_token_s" if self.kind == "prefill" else "decode_time_s",
            "original": self.original.to_dict(),
            "pruned": self.pruned.to_dict(),
            "speedup": speedup,
            "ideal_speedup": ideal,
            "measured_over_ideal": None if ideal is None else speedup / ideal,
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

    def workload(self, name: str) -> WorkloadResult:
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "removed": list(self.removed),
            "num_layers": self.num_layers,
            "kept_layers": self.num_layers - len(self.removed),
            "device": self.device,
            "dtype": self.dtype,
            "weights": dict(self.weights),
            "memory_method": dict(self.memory_method),
            "environment": dict(self.environment),
            "workloads": [w.to_dict(self.removed) for w in self.workloads],
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
    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.timer = _Timer(device)
        params = inspect.signature(model.forward).parameters
        self.logits_to_keep = "logits_to_keep" in params
        # transformers >= 5.24 names the KV cache ``cache`` (``past_key_values`` is deprecated)
        self.cache_name = "cache" if "cache" in params else "past_key_values"

    def _forward(self, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
        if cache is not None:
            kwargs[self.cache_name] = cache
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
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


def _schedule(pairs: int, order: str, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for i in range(pairs):
        first_original = i % 2 == 0 if order == "alternate" else bool(rng.integers(0, 2))
        out += [ORIGINAL, PRUNED] if first_original else [PRUNED, ORIGINAL]
    return out


def benchmark(
    model: nn.Module,
    removed: Sequence[int],
    config: BenchmarkConfig | None = None,
    progress: ProgressCallback | None = None,
) -> BenchmarkResult:
    """Measure ``model`` and its pruned view (``removed`` blocks taken out) in one process.

    The model is left exactly as it was (blocks, config, training mode). See the module
    docstring for what every number means.
    """
    config = config or BenchmarkConfig()
    loc = locate_blocks(model)
    num_layers = len(loc.blocks)
    removed_sorted = validate_removed(num_layers, removed)
    device = input_device(model)
    dtype = _model_dtype(model)
    vocab = _vocab_size(model)
    runner = _Runner(model, device)
    notes: list[str] = []
    if not runner.logits_to_keep:
        notes.append("the model has no logits_to_keep: prefill computes logits for every token")

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(STAGE, min(1.0, max(0.0, fraction)), message)

    workloads: list[tuple[str, str, int, int, int | None]] = [
        (f"prefill_b{b}_t{t}", "prefill", b, t, None) for b, t in config.prefill
    ] + [(f"decode_b{b}_p{t}_n{n}", "decode", b, t, n) for b, t, n in config.decode]
    runs_per_workload = (
        2 * (config.warmup + config.repetitions)
        + 2
        + (config.block_repetitions if config.measure_blocks else 0)
    )
    total_runs = runs_per_workload * len(workloads)
    done = 0
    started = time.perf_counter()

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            weights_original = model_bytes(model)
            with _variant(model, removed_sorted, PRUNED):
                weights_pruned = model_bytes(model)
            report(0.0, f"{len(workloads)} workloads, {total_runs} runs")
            mem_method = memory_method(device)
            results: list[WorkloadResult] = []
            for w_index, (name, kind, batch, prompt_len, new_tokens) in enumerate(workloads):
                gen = torch.Generator().manual_seed(config.seed + w_index)
                ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)

                def run(
                    which: str,
                    ids: torch.Tensor = ids,
                    kind: str = kind,
                    new_tokens: int | None = new_tokens,
                ) -> tuple[float, Any]:
                    with _variant(model, removed_sorted, which):
                        if kind == "prefill":
                            return runner.prefill(ids)
                        assert new_tokens is not None
                        return runner.decode(ids, new_tokens)

                # warm-up, alternating
                for i, which in enumerate(_schedule(config.warmup, "alternate", 0)):
                    run(which)
                    done += 1
                    report(done / total_runs, f"{name}: warm-up {i // 2 + 1}/{config.warmup}")
                # timed, counterbalanced
                schedule = _schedule(config.repetitions, config.order, config.seed + w_index)
                times: dict[str, list[float]] = {ORIGINAL: [], PRUNED: []}
                for which in schedule:
                    elapsed, cache = run(which)
                    del cache
                    times[which].append(elapsed)
                    done += 1
                    report(
                        done / total_runs,
                        f"{name}: {which} {len(times[which])}/{config.repetitions} "
                        f"{elapsed * 1e3:.1f} ms",
                    )
                # memory: one dedicated untimed run per model
                memory: dict[str, dict[str, Any]] = {}
                for which in (ORIGINAL, PRUNED):
                    probe = _MemoryProbe(device)
                    probe.start()
                    _, cache = run(which)
                    mem = probe.stop()
                    weight = weights_original if which == ORIGINAL else weights_pruned
                    kv = cache_bytes(cache)
                    del cache
                    mem = {"weight_bytes": weight, "kv_cache_bytes": kv, **mem}
                    if mem.get("peak_rss_delta_bytes") is not None:
                        mem["estimated_peak_bytes"] = weight + mem["peak_rss_delta_bytes"]
                    memory[which] = mem
                    done += 1
                    report(done / total_runs, f"{name}: memory of the {which} model")
                # block timings on the original model
                block_times: list[float] | None = None
                hooked_total: float | None = None
                if config.measure_blocks:
                    per_rep: list[list[float]] = []
                    totals_rep: list[float] = []
                    for r in range(config.block_repetitions):
                        acc = [0.0] * num_layers
                        with _block_hooks(loc.blocks, runner.timer, acc):
                            elapsed, cache = run(ORIGINAL)
                        del cache
                        per_rep.append(acc)
                        totals_rep.append(elapsed)
                        done += 1
                        report(
                            done / total_runs,
                            f"{name}: block timings {r + 1}/{config.block_repetitions}",
                        )
                    arr = np.asarray(per_rep, dtype=np.float64)
                    block_times = [float(v) for v in np.median(arr, axis=0)]
                    hooked_total = _median(totals_rep)
                tokens = batch * (prompt_len if kind == "prefill" else (new_tokens or 0))
                results.append(
                    WorkloadResult(
                        name=name,
                        kind=kind,
                        batch=batch,
                        prompt_len=prompt_len,
                        new_tokens=new_tokens,
                        original=RunStats(times[ORIGINAL], tokens, memory[ORIGINAL]),
                        pruned=RunStats(times[PRUNED], tokens, memory[PRUNED]),
                        schedule=schedule,
                        block_times_s=block_times,
                        hooked_total_s=hooked_total,
                    )
                )
    finally:
        model.train(was_training)

    removed_block_bytes = weights_original - weights_pruned
    weights: dict[str, int | float] = {
        "original_bytes": weights_original,
        "pruned_bytes": weights_pruned,
        "saved_bytes": removed_block_bytes,
        "saved_fraction": removed_block_bytes / weights_original if weights_original else 0.0,
    }
    total = time.perf_counter() - started
    report(1.0, f"done in {total:.1f} s")
    if any(not math.isfinite(w.speedup) for w in results):
        notes.append("a speedup is not finite (a zero median time)")
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
    )
