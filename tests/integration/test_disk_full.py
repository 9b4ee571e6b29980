"""The worker's work disk full mid-job (issue 24): a worker whose ``LORP_WORK_DIR`` is a small
tmpfs; the disk is filled while the job is parked before saving. The job fails with
``work_disk_full`` naming the stage, nothing is uploaded, the work directory is cleaned, and once
space is back the same worker runs the next job. Needs permission to mount a tmpfs (root here and
in CI's container); skipped with the reason otherwise."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack.faults import MountError, fill, small_disk
from devstack.testbed import HELD_PREFIX, HOLD_KEY, until
from tests.integration.conftest import TENANT_A, Service
from worker.runner import _disk_full

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk_dir() -> Iterator[Path]:
    try:
        with small_disk(64) as mount:
            yield mount
    except MountError as exc:
        pytest.skip(str(exc))


def test_disk_full_fails_cleanly_and_the_worker_recovers(
    service: Service, client_a: httpx.Client, small_disk_dir: Path
) -> None:
    stack = service.stack
    usual = stack.workers[0]
    usual.stop()  # only the worker on the small disk takes jobs
    saved_env = dict(stack.worker_env)
    stack.worker_env["LORP_WORK_DIR"] = str(small_disk_dir)
    worker = stack.add_worker()
    redis = service.redis()
    try:
        redis.set(HOLD_KEY, "pruning", ex=600)
        job_id = client_a.post("/jobs", json=service.job_body()).json()["id"]
        until("job held", lambda: redis.get(HELD_PREFIX + job_id) == "pruning")
        filler = fill(small_disk_dir)
        redis.delete(HOLD_KEY)
        job = service.wait(client_a, job_id, timeout=120)
        assert job["state"] == "failed", job
        assert job["error"]["code"] == "work_disk_full", job["error"]
        assert (
            "during saving" in job["error"]["message"]
            or "during pruning" in (job["error"]["message"])
        )
        assert service.artifact_keys(TENANT_A, job_id) == []
        assert not (small_disk_dir / job_id).exists()  # the job's work dir is gone
        filler.unlink()
        again = client_a.post("/jobs", json=service.job_body()).json()["id"]
        assert service.wait(client_a, again)["state"] == "succeeded"
        assert worker.alive()
    finally:
        redis.delete(HOLD_KEY)
        redis.close()
        worker.stop()
        stack.workers.remove(worker)
        stack.worker_env.clear()
        stack.worker_env.update(saved_env)
        usual.start()


def test_disk_full_is_recognised_through_wrappers() -> None:
    assert _disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert _disk_full(outer)
    assert _disk_full(Exception("I/O error: No space left on device (os error 28)"))
    assert not _disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not _disk_full(ValueError("bad"))
