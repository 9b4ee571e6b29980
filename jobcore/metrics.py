"""Job metrics shared by every worker and read by every API process: per-stage duration
histograms and finished-job counts, kept in Redis (the workers are separate processes, often on
other machines, so a per-process Prometheus registry would not do). A worker records a job once
it ends (:func:`record_job`); ``/metrics`` reads them at scrape time (:func:`read_job_metrics`).

Keys::

    lorp:metrics:stage:{stage}   HASH  b<i> -> jobs whose stage took <= STAGE_BUCKETS[i] seconds
                                       (not cumulative), sum, count
    lorp:metrics:jobs            HASH  final state -> jobs that ended in it
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from redis import Redis

#: Upper bounds (seconds) of the stage-duration histogram; the last is +Inf.
STAGE_BUCKETS: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, math.inf)
_STAGE_PREFIX = "lorp:metrics:stage:"
_JOBS_KEY = "lorp:metrics:jobs"


def record_job(redis: Redis, state: str, timings: Mapping[str, float]) -> None:
    """Count a job that ended in ``state`` and add each stage's seconds to its histogram."""
    pipe = redis.pipeline(transaction=False)
    pipe.hincrby(_JOBS_KEY, state, 1)
    for stage, seconds in timings.items():
        if not math.isfinite(seconds) or seconds < 0:
            continue
        key = _STAGE_PREFIX + stage
        pipe.hincrby(key, f"b{bisect.bisect_left(STAGE_BUCKETS, seconds)}", 1)
        pipe.hincrbyfloat(key, "sum", seconds)
        pipe.hincrby(key, "count", 1)
    pipe.execute()


@dataclass(frozen=True)
class StageHistogram:
    """Cumulative bucket counts (``le`` -> count, as Prometheus exposes them), sum, count."""

    buckets: list[tuple[float, int]]
    total: float
    count: int


def read_job_metrics(redis: Redis) -> tuple[dict[str, StageHistogram], dict[str, int]]:
    """Every stage's histogram and the finished-job counts by state."""
    stages: dict[str, StageHistogram] = {}
    for key in cast("list[str]", list(redis.scan_iter(match=_STAGE_PREFIX + "*", count=200))):
        raw = cast("dict[str, str]", redis.hgetall(key))
        running = 0
        buckets = []
        for i, bound in enumerate(STAGE_BUCKETS):
            running += int(raw.get(f"b{i}", 0))
            buckets.append((bound, running))
        stages[key[len(_STAGE_PREFIX) :]] = StageHistogram(
            buckets, float(raw.get("sum", 0.0)), int(raw.get("count", 0))
        )
    jobs = {k: int(v) for k, v in cast("dict[str, str]", redis.hgetall(_JOBS_KEY)).items()}
    return stages, jobs
