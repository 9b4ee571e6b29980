"""Worker loss and the object-store client against the real stack."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from jobcore.config import Settings
from jobcore.errors import StorageNotFoundError
from jobcore.spec import validate_job
from jobcore.storage import MiB, Storage
from jobcore.store import JobStore
from tests.integration.conftest import ARTIFACT_BUCKET, TENANT_A, Service
from worker.runner import MAX_ATTEMPTS, JobRunner

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(k) for k in text]
    return kids


def test_killed_worker_process_redelivers_and_starts_clean(
    service: Service, client_a: httpx.Client
) -> None:
    body = service.job_body(
        benchmark={
            "prefill": [[1, 32]],
            "decode": [],
            "warmup": 1,
            "repetitions": 20,
            "measure_blocks": False,
        }
    )
    job_id = client_a.post("/jobs", json=body).json()["id"]
    service.wait(client_a, job_id, until=lambda j: j["progress"]["stage"] == "benchmark")
    # Leftovers of the attempt we are about to kill must not survive the redelivery.
    prefix = f"{TENANT_A}/jobs/{job_id}/"
    service.s3().put_object(Bucket=ARTIFACT_BUCKET, Key=prefix + "stale.bin", Body=b"partial")
    worker = service.stack.workers[0]
    assert worker.pid is not None
    pool = _children(worker.pid)
    assert pool, "no pool process to kill"
    for pid in pool:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()

    service.wait(client_a, job_id, until=lambda j: j["attempts"] == 2, timeout=60)
    recovery = time.monotonic() - killed_at  # until the redelivered run started
    print(f"redelivered and restarted {recovery:.1f}s after SIGKILL")
    assert recovery < 30, recovery
    job = service.wait(client_a, job_id, timeout=180)
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    manifest = json.loads(
        service.s3().get_object(Bucket=ARTIFACT_BUCKET, Key=prefix + "manifest.json")["Body"].read()
    )
    names = {f["name"] for f in manifest["files"]}
    assert {k[len(prefix) :] for k in service.artifact_keys(TENANT_A, job_id)} == names | {
        "manifest.json"
    }
    # The worker is healthy afterwards (the main process replaced its pool child).
    assert worker.alive()


def test_whole_worker_killed_job_resumes_on_restart(
    service: Service, client_a: httpx.Client
) -> None:
    body = service.job_body(
        benchmark={
            "prefill": [[1, 32]],
            "decode": [],
            "warmup": 1,
            "repetitions": 20,
            "measure_blocks": False,
        }
    )
    job_id = client_a.post("/jobs", json=body).json()["id"]
    service.wait(client_a, job_id, until=lambda j: j["progress"]["stage"] == "benchmark")
    worker = service.stack.workers[0]
    worker.kill()  # main process and pool together: the message stays unacked in Redis
    assert not worker.alive()
    assert client_a.get(f"/jobs/{job_id}").json()["state"] == "running"
    time.sleep(10.5)  # the dead run's lock expires (10 s TTL, no heartbeat any more)
    restarted_at = time.monotonic()
    worker.start()
    service.wait(client_a, job_id, until=lambda j: j["attempts"] == 2, timeout=60)
    print(f"resumed {time.monotonic() - restarted_at:.1f}s after the worker restart")
    job = service.wait(client_a, job_id, timeout=180)
    assert job["state"] == "succeeded" and job["attempts"] == 2


def test_object_store_down_fails_cleanly_then_resubmit_succeeds(
    service: Service, client_a: httpx.Client
) -> None:
    body = service.job_body(
        benchmark={
            "prefill": [[1, 32]],
            "decode": [],
            "warmup": 1,
            "repetitions": 20,
            "measure_blocks": False,
        }
    )
    job_id = client_a.post("/jobs", json=body).json()["id"]
    service.wait(client_a, job_id, until=lambda j: j["progress"]["stage"] == "benchmark")
    s3 = service.stack.s3
    s3.stop()
    try:
        job = service.wait(client_a, job_id, timeout=120)
        assert job["state"] == "failed", job
        assert job["error"]["code"] == "storage_unavailable"
        ready = client_a.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"] == {"redis": True, "s3": False}
        assert client_a.get(f"/jobs/{job_id}/artifacts").status_code == 409
    finally:
        s3.start()
    prefix = f"{TENANT_A}/jobs/{job_id}/"
    keys = service.artifact_keys(TENANT_A, job_id)
    assert prefix + "manifest.json" not in keys  # nothing committed
    again = client_a.post("/jobs", json=body).json()["id"]
    assert service.wait(client_a, again, timeout=180)["state"] == "succeeded"


@pytest.fixture
def storage(service: Service, monkeypatch: pytest.MonkeyPatch) -> Storage:
    for key, value in service.stack.env.items():
        monkeypatch.setenv(key, value)
    return Storage(
        Settings(),  # type: ignore[call-arg]
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
    )


def test_storage_multipart_prefix_and_presign(storage: Storage, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MiB + 123))
    storage.upload_file(big, "storage-test/dir/big.bin")
    storage.put_bytes("storage-test/dir/sub/small.txt", b"small")
    head = storage.client.head_object(Bucket=storage.bucket, Key="storage-test/dir/big.bin")
    assert head["ContentLength"] == big.stat().st_size
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5 MiB

    got = storage.download_prefix("storage-test/dir", tmp_path / "down")
    assert sorted(p.relative_to(tmp_path / "down").as_posix() for p in got) == [
        "big.bin",
        "sub/small.txt",
    ]
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    assert hashlib.sha256((tmp_path / "down" / "big.bin").read_bytes()).hexdigest() == digest

    url = storage.presign_get("storage-test/dir/sub/small.txt", ttl=60)
    assert httpx.get(url).content == b"small"
    short = storage.presign_get("storage-test/dir/sub/small.txt", ttl=1)
    time.sleep(2.5)
    assert httpx.get(short).status_code == 403  # expired link

    assert storage.delete_prefix("storage-test/") == 2
    assert storage.list_prefix("storage-test/") == []
    with pytest.raises(StorageNotFoundError):
        storage.head("storage-test/dir/big.bin")


def test_runner_guards(service: Service, storage: Storage) -> None:
    """JobRunner in this process against the stack's Redis and S3: duplicate deliveries,
    a lock held by a live process, and the redelivery limit."""
    settings = Settings()  # type: ignore[call-arg]  # env set by the storage fixture
    store = JobStore.from_settings(settings, for_worker=True)
    runner = JobRunner(settings, store, storage)
    spec = validate_job(service.job_body(), settings, TENANT_A)
    try:
        rec, _ = store.create(TENANT_A, spec)
        # Lock held by a live process (this one, under another token): busy, state untouched.
        holder = f"{socket.gethostname()}:{os.getpid()}:other"
        assert store.acquire_lock(rec.id, holder, 10_000)
        assert runner.run(rec.id) == "busy"
        assert store.get(TENANT_A, rec.id).state == "queued"
        store.release_lock(rec.id, holder)
        # A job whose earlier runs all died with their worker is failed, not run again.
        store.redis.hset(f"lorp:job:{rec.id}", "attempts", MAX_ATTEMPTS)
        assert runner.run(rec.id) == "failed"
        failed = store.get(TENANT_A, rec.id)
        assert failed.error is not None and failed.error["code"] == "worker_lost"
        # Terminal jobs are never touched again; unknown ids are dropped.
        assert runner.run(rec.id) == "skipped"
        assert runner.run("f" * 32) == "missing"
    finally:
        store.close()
