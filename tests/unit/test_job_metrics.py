"""jobcore.metrics on a real redis-server: what workers record is what /metrics exposes."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from redis import Redis

from devstack.stack import RedisServer
from jobcore.metrics import STAGE_BUCKETS, read_job_metrics, record_job


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    client = Redis.from_url(server.url, decode_responses=True)
    yield client
    client.close()
    server.stop()


def test_stage_histograms_and_job_counts(redis: Redis) -> None:
    record_job(redis, "succeeded", {"calibration": 0.5, "selection": 7.0, "uploading": 4000.0})
    record_job(redis, "succeeded", {"calibration": 1.0, "selection": 61.0})
    record_job(redis, "failed", {"calibration": 2.0, "bogus": float("nan"), "neg": -1.0})
    stages, jobs = read_job_metrics(redis)
    assert jobs == {"succeeded": 2, "failed": 1}
    assert set(stages) == {"calibration", "selection", "uploading"}  # nan / negative skipped
    cal = stages["calibration"]
    assert (cal.count, cal.total) == (3, 3.5)
    le = dict(cal.buckets)
    assert (le[1], le[5], le[math.inf]) == (2, 3, 3)  # cumulative; 1.0 is in the <=1 bucket
    sel = dict(stages["selection"].buckets)
    assert (sel[5], sel[15], sel[60], sel[120]) == (0, 1, 1, 2)
    up = stages["uploading"].buckets
    assert [n for _, n in up] == [0] * (len(STAGE_BUCKETS) - 1) + [1]  # only +Inf
