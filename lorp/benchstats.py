"""The benchmark's statistics: the speedup's confidence interval, the stopping rule, and whether
the machine's load changed while a workload was timed. Pure functions of numbers (no torch), so
they are tested on synthetic timing sequences.

Speedup and its interval
    A workload is timed in A/B pairs (original and pruned, order alternated). The speedup is the
    ratio of the medians, median(original) / median(pruned), as before. Its 95% interval is a
    paired bootstrap: the pairs are resampled with replacement (:data:`BOOTSTRAP_RESAMPLES`
    times, a fixed seed, so the same times give the same interval) and the ratio of medians of
    every resample taken; the interval is their 2.5th and 97.5th percentiles. Resampling whole
    pairs keeps what the alternation buys: drift that slows both runs of a pair cancels. The
    half-width is the larger distance of either end from the estimate, relative to it (0.02 is
    "within ±2%").

Stopping rule (:func:`sample_pairs`)
    Pairs are run until the interval's half-width is at most ``target`` (default ±2%) after at
    least ``min_pairs`` pairs, or the workload's share of the time budget is spent (the rule
    also stops when one more pair like the last would overrun it), or ``max_pairs`` were run.

Reliability (:func:`assess`)
    A workload is marked unreliable, with the reasons, when its interval is wider than
    ``unreliable`` (default ±5%) or the machine's load changed while it ran
    or was busy (:func:`load_changes`: the other processes' CPU use, CPU steal, the load
    average, other GPU processes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "CONFIDENCE",
    "LoadSample",
    "Sampling",
    "SpeedupInterval",
    "StoppingRule",
    "assess",
    "load_changes",
    "read_load",
    "sample_pairs",
    "speedup_interval",
]

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
INTERVAL_METHOD = (
    "95% paired bootstrap over the A/B pairs (2000 resamples, fixed seed) of the ratio of medians"
)

#: Load-change thresholds (:func:`load_changes`).
OTHERS_CPU_CHANGE = 0.25  # change of the other processes' share of all CPUs between intervals
OTHERS_CPU_BUSY = 0.5  # the other processes' share of all CPUs over the run: a contended machine
STEAL_SHARE = 0.05  # CPU time taken by the hypervisor, share of all CPUs
LOAD_INTERVAL_S = 1.0  # samples are merged into intervals at least this long
_PROC_STAT = Path("/proc/stat")


# --------------------------------------------------------------------------------------------
# The interval


@dataclass(frozen=True)
class SpeedupInterval:
    """Ratio of medians and its bootstrap interval (``low``/``high`` None with fewer than two
    pairs: no interval, infinitely wide)."""

    estimate: float
    low: float | None
    high: float | None
    pairs: int

    @property
    def half_width(self) -> float:
        if self.low is None or self.high is None or not self.estimate > 0:
            return math.inf
        return max(self.high / self.estimate - 1.0, 1.0 - self.low / self.estimate)

    def to_dict(self) -> dict[str, Any]:
        half = self.half_width
        return {
            "low": self.low,
            "high": self.high,
            "half_width": half if math.isfinite(half) else None,
            "confidence": CONFIDENCE,
            "pairs": self.pairs,
            "method": INTERVAL_METHOD,
        }


def speedup_interval(
    original: Sequence[float],
    pruned: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> SpeedupInterval:
    """median(original) / median(pruned) with its 95% paired bootstrap interval.

    ``original[i]`` and ``pruned[i]`` are the two runs of pair ``i``."""
    o = np.asarray(original, dtype=np.float64)
    p = np.asarray(pruned, dtype=np.float64)
    if o.shape != p.shape or o.ndim != 1 or o.size == 0:
        raise ValueError("original and pruned need the same number of pairs, at least one")
    med_p = float(np.median(p))
    estimate = float(np.median(o)) / med_p if med_p > 0 else math.inf
    n = int(o.size)
    if n < 2 or not math.isfinite(estimate):
        return SpeedupInterval(estimate, None, None, n)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    num = np.median(o[idx], axis=1)
    den = np.median(p[idx], axis=1)
    ratios = num[den > 0] / den[den > 0]
    if ratios.size == 0:
        return SpeedupInterval(estimate, None, None, n)
    alpha = (1.0 - CONFIDENCE) / 2
    low, high = (float(v) for v in np.quantile(ratios, [alpha, 1.0 - alpha]))
    return SpeedupInterval(estimate, min(low, estimate), max(high, estimate), n)


# --------------------------------------------------------------------------------------------
# The stopping rule


@dataclass(frozen=True)
class StoppingRule:
    """When to stop timing pairs: ``target`` half-width reached (after ``min_pairs``), the
    share of the budget spent, or ``max_pairs``; ``unreliable``: the half-width above which the
    result is marked unreliable."""

    target: float = 0.02
    unreliable: float = 0.05
    min_pairs: int = 3
    max_pairs: int = 20
    seed: int = 0


@dataclass
class Sampling:
    """What :func:`sample_pairs` ran: the times of every pair, why it stopped
    (``"converged"``, ``"budget"``, ``"max_pairs"``) and the final interval."""

    original: list[float]
    pruned: list[float]
    stop_reason: str
    interval: SpeedupInterval
    pair_ends: list[float] = field(default_factory=list)  # clock() after every pair


def sample_pairs(
    run_pair: Callable[[int], tuple[float, float]],
    rule: StoppingRule,
    deadline: float,
    clock: Callable[[], float],
) -> Sampling:
    """Run ``run_pair(i)`` (returning the original's and the pruned model's time of pair
    ``i``) until ``rule`` says stop; ``deadline``: the ``clock()`` value by which the
    workload's share of the budget is spent."""
    original: list[float] = []
    pruned: list[float] = []
    ends: list[float] = []
    interval = SpeedupInterval(math.nan, None, None, 0)
    reason = "max_pairs"
    for i in range(rule.max_pairs):
        start = clock()
        o, p = run_pair(i)
        now = clock()
        original.append(float(o))
        pruned.append(float(p))
        ends.append(now)
        if i + 1 < rule.min_pairs:
            continue
        interval = speedup_interval(original, pruned, seed=rule.seed)
        if interval.half_width <= rule.target:
            reason = "converged"
            break
        if now + (now - start) > deadline:  # one more pair like this one would overrun
            reason = "budget"
            break
    if interval.pairs != len(original):  # max_pairs < min_pairs
        interval = speedup_interval(original, pruned, seed=rule.seed)
    return Sampling(original, pruned, reason, interval, ends)


# --------------------------------------------------------------------------------------------
# Machine load


@dataclass(frozen=True)
class LoadSample:
    """One reading of the machine's load.

    ``wall``: a monotonic clock (s); ``loadavg``: 1-minute load average; ``cpu_busy_s`` /
    ``cpu_steal_s`` / ``cpu_total_s``: CPU time of all CPUs from ``/proc/stat`` (busy excludes
    idle, iowait and steal); ``own_cpu_s``: this process's CPU time (all threads);
    ``gpu_others``: other processes on the GPU (None: not known)."""

    wall: float
    loadavg: float | None
    cpu_busy_s: float | None
    cpu_steal_s: float | None
    cpu_total_s: float | None
    own_cpu_s: float
    gpu_others: tuple[int, ...] | None = None


def _proc_stat() -> tuple[float, float, float] | None:
    try:
        first = _PROC_STAT.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not first or first[0] != "cpu" or len(first) < 9:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    busy = user + nice + system + irq + softirq
    total = busy + idle + iowait + steal
    return busy / hz, steal / hz, total / hz


def read_load(wall: float, gpu_others: tuple[int, ...] | None = None) -> LoadSample:
    """The load now (``wall``: the caller's monotonic clock)."""
    try:
        loadavg: float | None = os.getloadavg()[0]
    except (OSError, AttributeError):
        loadavg = None
    stat = _proc_stat()
    times = os.times()
    return LoadSample(
        wall=wall,
        loadavg=loadavg,
        cpu_busy_s=None if stat is None else stat[0],
        cpu_steal_s=None if stat is None else stat[1],
        cpu_total_s=None if stat is None else stat[2],
        own_cpu_s=times.user + times.system,
        gpu_others=gpu_others,
    )


def _intervals(samples: Sequence[LoadSample]) -> list[tuple[LoadSample, LoadSample]]:
    """Consecutive samples merged into intervals of at least :data:`LOAD_INTERVAL_S`."""
    out = []
    start = samples[0]
    for s in samples[1:]:
        if s.wall - start.wall >= LOAD_INTERVAL_S:
            out.append((start, s))
            start = s
    if not out and len(samples) > 1:
        out.append((samples[0], samples[-1]))
    return out


def _others_share(a: LoadSample, b: LoadSample) -> float | None:
    if a.cpu_busy_s is None or b.cpu_busy_s is None or a.cpu_total_s is None:
        return None
    if b.cpu_total_s is None:
        return None
    total = b.cpu_total_s - a.cpu_total_s
    if total <= 0:
        return None
    busy = b.cpu_busy_s - a.cpu_busy_s
    own = b.own_cpu_s - a.own_cpu_s
    return min(1.0, max(0.0, (busy - own) / total))


def load_changes(samples: Sequence[LoadSample], own_threads: int = 1) -> dict[str, Any]:
    """What the load did while a workload ran (samples in time order: one before, one after
    every pair) and the reasons it makes the timing unreliable:

    - the other processes' share of all CPUs (busy CPU time minus this process's) differs by
      more than :data:`OTHERS_CPU_CHANGE` between intervals of at least
      :data:`LOAD_INTERVAL_S`;
    - the other processes used more than :data:`OTHERS_CPU_BUSY` of all CPUs over the run
      (contended: steady or not, their load competes for the cores and the caches);
    - CPU steal above :data:`STEAL_SHARE` of all CPU time;
    - the 1-minute load average rose or fell by more than this process's own threads
      (``own_threads``, its own ramp) plus max(1, half the CPUs);
    - the set of other processes on the GPU changed.
    """
    out: dict[str, Any] = {
        "loadavg_start": None,
        "loadavg_end": None,
        "others_cpu_share_min": None,
        "others_cpu_share_max": None,
        "steal_share": None,
        "gpu_other_processes": None,
        "reasons": [],
    }
    if len(samples) < 2:
        return out
    first, last = samples[0], samples[-1]
    reasons: list[str] = out["reasons"]
    out["loadavg_start"], out["loadavg_end"] = first.loadavg, last.loadavg
    shares = [s for s in (_others_share(a, b) for a, b in _intervals(samples)) if s is not None]
    if shares:
        lo, hi = min(shares), max(shares)
        out["others_cpu_share_min"], out["others_cpu_share_max"] = lo, hi
        if hi - lo > OTHERS_CPU_CHANGE:
            reasons.append(
                f"other processes' CPU use changed between {100 * lo:.0f}% and {100 * hi:.0f}% "
                "of the machine during the run"
            )
        overall = _others_share(first, last)
        if overall is not None and overall > OTHERS_CPU_BUSY:
            reasons.append(
                f"other processes used {100 * overall:.0f}% of the CPUs during the run "
                "(a contended machine)"
            )
    if (
        first.cpu_steal_s is not None
        and last.cpu_steal_s is not None
        and first.cpu_total_s is not None
        and last.cpu_total_s is not None
        and last.cpu_total_s > first.cpu_total_s
    ):
        steal = (last.cpu_steal_s - first.cpu_steal_s) / (last.cpu_total_s - first.cpu_total_s)
        out["steal_share"] = steal
        if steal > STEAL_SHARE:
            reasons.append(f"CPU steal took {100 * steal:.0f}% of the CPU time during the run")
    if first.loadavg is not None and last.loadavg is not None:
        cpus = os.cpu_count() or 1
        limit = own_threads + max(1.0, cpus / 2)
        if abs(last.loadavg - first.loadavg) > limit:
            reasons.append(
                f"the load average went from {first.loadavg:.2f} to {last.loadavg:.2f} during "
                f"the run (more than {limit:.1f} apart)"
            )
    gpu = [s.gpu_others for s in samples if s.gpu_others is not None]
    if gpu:
        seen = sorted(set().union(*gpu))
        out["gpu_other_processes"] = seen
        if any(g != gpu[0] for g in gpu):
            reasons.append(
                "other processes started or stopped on the GPU during the run "
                f"(pids {', '.join(map(str, seen))})"
            )
    return out


def assess(interval: SpeedupInterval, load: dict[str, Any], rule: StoppingRule) -> list[str]:
    """Why a workload's speedup is unreliable (empty: reliable)."""
    reasons = []
    half = interval.half_width
    if not math.isfinite(half):
        reasons.append("no confidence interval (fewer than two pairs)")
    elif half > rule.unreliable:
        reasons.append(
            f"95% interval ±{100 * half:.1f}% is wider than ±{100 * rule.unreliable:.0f}%"
        )
    reasons += list(load.get("reasons") or [])
    return reasons
