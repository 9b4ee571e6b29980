"""Celery app for integration tests: the real worker plus a test-only hold point.

``celery -A tests.integration.hold_worker worker ...`` runs exactly ``worker.celery_app`` with one
addition: when the Redis key :data:`HOLD_KEY` holds ``"<stage>"`` or ``"<stage>#<n>"``, a job
stops at the n-th (default first) progress report of that stage, records
``lorp:test:held:<job id> = <stage>`` and waits there until the client cancels it or the key is
deleted. Tests use it to cancel a job in a stage that would otherwise pass too quickly to catch
(downloading, loading, saving ...), without sleeping. A second fault point: while
:data:`OOM_KEY` holds ``"<stage>"``, the first progress report inside that stage's work raises
``torch.OutOfMemoryError`` (what a CUDA allocation that does not fit raises), so a test sees
the whole stack's answer to running out of memory. With the keys unset the worker behaves as in
production (two extra Redis GETs per progress report).
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from celery.signals import worker_process_init
from redis import Redis
from redis.exceptions import RedisError

from devstack.testbed import HELD_PREFIX, HOLD_KEY, OOM_KEY
from lorp.errors import CancelledError
from worker import tasks as _tasks  # noqa: F401  (registers the task and worker signals)
from worker.celery_app import app, settings
from worker.runner import _Progress

__all__ = ["HELD_PREFIX", "HOLD_KEY", "OOM_KEY", "app", "settings"]

#: Test-only: each pool process limits its address space to its size when started plus this
#: many MiB (benchmarks/reliability: a worker that runs out of memory).
RLIMIT_ENV = "LORP_TEST_RLIMIT_AS_MB"


@worker_process_init.connect
def _limit_memory(**_: object) -> None:
    headroom = os.environ.get(RLIMIT_ENV)
    if not headroom:
        return
    status = Path("/proc/self/status").read_text()
    vm_kib = int(next(ln for ln in status.splitlines() if ln.startswith("VmSize:")).split()[1])
    limit = vm_kib * 1024 + int(headroom) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(f"RLIMIT_AS set to {limit // (1024 * 1024)} MB", file=sys.stderr, flush=True)


MAX_HOLD_SECONDS = 120.0

_original_call = _Progress.__call__


@functools.cache
def _probe() -> Redis:
    """A fail-fast client (no retries): while Redis is down the hold point is simply off, so
    the job runs exactly as in production."""
    return Redis.from_url(
        settings.redis_url, decode_responses=True, socket_timeout=0.5, socket_connect_timeout=0.5
    )


def _hold_value(key: str = HOLD_KEY) -> str | None:
    try:
        value = _probe().get(key)
    except RedisError:
        return None
    return str(value) if value else None


def _held_call(self: _Progress, stage: str, fraction: float, message: str) -> None:
    _original_call(self, stage, fraction, message)  # records progress; may raise CancelledError
    if 0.0 < fraction < 1.0 and _hold_value(OOM_KEY) == stage:  # inside the stage's work
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by the test in {stage})")
    want = _hold_value()
    if not want:
        return
    want_stage, _, nth = want.partition("#")
    if stage != want_stage:
        return
    counts: Counter[str] = self.__dict__.setdefault("_hold_counts", Counter())
    counts[stage] += 1
    if counts[stage] != int(nth or 1):
        return
    job_id = self.rec.id
    self.store.set_progress(self.rec, stage, fraction, message)  # visible even when throttled
    self.store.redis.set(HELD_PREFIX + job_id, stage, ex=600)
    deadline = time.monotonic() + MAX_HOLD_SECONDS
    while time.monotonic() < deadline:
        try:
            if self.store.cancel_requested(job_id):
                raise CancelledError(f"cancelled by the client during {stage}")
            if not self.store.redis.get(HOLD_KEY):
                return
        except RedisError:  # Redis restarting while held: stay held
            pass
        time.sleep(0.05)


_Progress.__call__ = _held_call  # type: ignore[method-assign]
