"""The fleet's reliability scenarios (issue 24), run by ``benchmarks/reliability/run.py`` on its
stack: two workers sharing 20 jobs of 4 tenants, one of two workers SIGKILLed, the work disk full,
the object store slow and flapping, a webhook receiver down / slow / up, an API process killed
under load, and expiry while jobs are queued and running. Each returns
``{"outcome": "pass"|"fail", "figures": {...}, "notes": str}`` like the scenarios in ``run.py``."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from devstack.faults import MountError, fill, small_disk
from devstack.receiver import WebhookReceiver
from devstack.stack import CeleryWorker, free_port
from devstack.testbed import ARTIFACT_BUCKET, SMALL_BENCH, TENANT_A, until

if TYPE_CHECKING:
    from benchmarks.reliability.run import Bench

#: Tenants of the two-worker scenario (API key -> tenant; run.py adds them to the stack).
FLEET_KEYS = {f"key-fleet-{n}-0123456789": f"fleet{n}" for n in range(4)}
#: The stack's per-tenant running limit (run.py sets LORP_TENANT_MAX_RUNNING to it).
MAX_RUNNING = 1
WEBHOOK_SECRET = "reliability-webhook-secret"
#: The stack's retention (run.py sets LORP_JOB_RETENTION_SECONDS; the sweep is run directly).
RETENTION_S = 30
#: The out-of-memory scenario's pool process may map this much beyond its size when idle.
HEADROOM_MB = 600


def manifest_matches(b: Bench, tenant: str, job_id: str) -> bool:
    """The objects under the job's prefix are exactly its manifest's files plus the manifest."""
    prefix = f"{tenant}/jobs/{job_id}/"
    keys = {k[len(prefix) :] for k in b.svc.artifact_keys(tenant, job_id)}
    if "manifest.json" not in keys:
        return False
    body = b.svc.s3().get_object(Bucket=ARTIFACT_BUCKET, Key=prefix + "manifest.json")["Body"]
    return keys == {f["name"] for f in json.loads(body.read())["files"]} | {"manifest.json"}


@contextlib.contextmanager
def _extra_worker(b: Bench, **env: str) -> Iterator[CeleryWorker]:
    """A second worker for the scenario (with ``env`` on top of the stack's worker env)."""
    saved = dict(b.stack.worker_env)
    b.stack.worker_env.update(env)
    worker = b.stack.add_worker()
    b.stack.worker_env.clear()
    b.stack.worker_env.update(saved)
    try:
        yield worker
    finally:
        worker.stop()
        b.stack.workers.remove(worker)


# --------------------------------------------------------------------------------------------


def two_workers_four_tenants(b: Bench, jobs: int = 20) -> dict[str, Any]:
    """20 tiny jobs from 4 tenants on two workers, each tenant limited to one running job:
    every job succeeds exactly once, no tenant ever above its limit, and the finish order
    interleaves the tenants (fair share: each tenant's median finish position)."""
    clients = {t: b.svc.client(k) for k, t in FLEET_KEYS.items()}
    running_seen: dict[str, int] = dict.fromkeys(clients, 0)
    stop = threading.Event()

    def watch() -> None:  # the tenants' running jobs, sampled
        while not stop.is_set():
            for tenant, c in clients.items():
                with contextlib.suppress(httpx.HTTPError):
                    page = c.get("/jobs", params={"state": "running", "limit": 100}).json()
                    running_seen[tenant] = max(running_seen[tenant], len(page["items"]))
            time.sleep(0.3)

    # inputs every tenant may read: the local model and the operator's corpus
    body = b.svc.job_body(
        model=str(b.svc.model_local),
        calibration="corpus:handbook",
        evaluation=None,
        budget={"blocks": 1},
    )
    with _extra_worker(b):
        started = time.monotonic()
        ids: dict[str, str] = {}
        for n in range(jobs):  # tenant 0 submits its five first: the worst case for fairness
            tenant = list(clients)[min(3, n // 5) if n < 5 else n % 4]
            resp = clients[tenant].post("/jobs", json=body)
            resp.raise_for_status()
            ids[resp.json()["id"]] = tenant
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        finished: dict[str, dict[str, Any]] = {}
        for job_id, tenant in ids.items():
            finished[job_id] = b.svc.wait(clients[tenant], job_id, timeout=600)
        stop.set()
        watcher.join()
        wall = time.monotonic() - started
    for c in clients.values():
        c.close()
    order = sorted(finished, key=lambda j: finished[j]["finished_at"])
    positions: dict[str, list[int]] = {}
    for pos, job_id in enumerate(order):
        positions.setdefault(ids[job_id], []).append(pos)
    median_pos = {t: sorted(p)[len(p) // 2] for t, p in positions.items()}
    states = [j["state"] for j in finished.values()]
    attempts = [j["attempts"] for j in finished.values()]
    ok = all(s == "succeeded" for s in states) and all(a == 1 for a in attempts)
    ok = ok and max(running_seen.values()) <= MAX_RUNNING
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "jobs": jobs,
            "tenants": len(clients),
            "succeeded": states.count("succeeded"),
            "errors": sorted(
                {
                    f"{j['error']['code']}: {j['error']['message'][:120]}"
                    for j in finished.values()
                    if j.get("error")
                }
            ),
            "max_attempts": max(attempts),
            "max_running_per_tenant_seen": max(running_seen.values()),
            "median_finish_position_by_tenant": median_pos,
            "wall_s": round(wall, 1),
        },
        "notes": (
            f"two prefork workers; LORP_TENANT_MAX_RUNNING={MAX_RUNNING}; tenant fleet0 "
            "submitted 5 jobs before the others (running jobs sampled every 0.3 s)"
        ),
    }


def one_of_two_workers_killed(b: Bench) -> dict[str, Any]:
    """A worker SIGKILLed whole mid-job with a second one alive: the housekeeper re-sends the
    job once its run lock expires and the survivor finishes it, once."""
    first = b.stack.workers[0]
    b.hold("benchmark")
    job_id = b.submit(benchmark=SMALL_BENCH)
    b.wait_held(job_id, "benchmark")
    with _extra_worker(b) as second:
        first.kill()
        killed = time.monotonic()
        b.release()
        b.wait(job_id, until=lambda j: j["attempts"] >= 2, timeout=120)
        resumed = time.monotonic() - killed
        job = b.wait(job_id)
        done = time.monotonic() - killed
        survivor_ran_it = job_id in second.log_text()
        first.start()
    ok = job["state"] == "succeeded" and job["attempts"] == 2
    ok = ok and manifest_matches(b, TENANT_A, job_id) and survivor_ran_it
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "resumed_on_the_other_worker_s": round(resumed, 1),
            "succeeded_after_kill_s": round(done, 1),
            "attempts": job["attempts"],
            "objects_match_manifest": manifest_matches(b, TENANT_A, job_id),
        },
        "notes": "run lock TTL 10 s + the housekeeper's orphan sweep every 15 s",
    }


def worker_out_of_memory(b: Bench) -> dict[str, Any]:
    """A worker whose pool can allocate little (RLIMIT_AS a little above its size when idle)
    gets a job whose model does not fit: the job ends ``failed`` with a clear code and the
    worker takes the next job."""
    big = b.svc.local_root / "big-llama"
    if not big.exists():
        _save_big_model(big)
    usual = b.stack.workers[0]
    usual.stop()
    limit_mb = 0
    try:
        # no size limit of the operator's: the refusal must come from running out of memory
        # (few malloc arenas: each thread's would reserve 64 MB of the address space)
        with _extra_worker(
            b,
            LORP_TEST_RLIMIT_AS_MB=str(HEADROOM_MB),
            LORP_MAX_MODEL_BYTES=str(10**12),
            MALLOC_ARENA_MAX="2",
        ) as worker:
            limit_mb = int(until("limit", lambda: _limit_mb(worker), timeout=30))
            job_id = b.submit(model=str(big), evaluation=None)
            job = b.wait(job_id, timeout=300)
            nxt = b.wait(b.submit(budget={"blocks": 1}))
            alive = worker.alive()
    finally:
        usual.start()
    code = (job.get("error") or {}).get("code")
    ok = job["state"] == "failed" and code in ("model_too_large", "out_of_memory")
    ok = ok and nxt["state"] == "succeeded" and alive
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "rlimit_as_mb": limit_mb,
            "state": job["state"],
            "error_code": code,
            "message": ((job.get("error") or {}).get("message") or "")[:160],
            "next_job": nxt["state"],
            "next_job_error": (nxt.get("error") or {}).get("message"),
            "worker_alive": alive,
        },
        "notes": f"model ~0.8 GB in float32; RLIMIT_AS = the idle pool process + {HEADROOM_MB} MB",
    }


def _save_big_model(path: Path) -> None:
    """A random Llama of ~200 M parameters (~0.8 GB in float32) with the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import CONFIGS, tiny_tokenizer

    config = CONFIGS["llama"]()
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 1024, 4096, 12
    config.num_attention_heads = config.num_key_value_heads = 16
    config.head_dim = 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


def _limit_mb(worker: CeleryWorker) -> int | None:
    text = worker.log_text()
    marker = "RLIMIT_AS set to "
    if marker not in text:
        return None
    return int(text.split(marker, 1)[1].split(" ", 1)[0])


def work_disk_full(b: Bench) -> dict[str, Any]:
    """The worker's work directory on a 64 MiB tmpfs, filled while a job is parked before
    saving: ``work_disk_full``, nothing uploaded, and the next job runs once there is space."""
    try:
        disk = small_disk(64)
        mount = disk.__enter__()
    except MountError as exc:
        return {"outcome": "skipped", "figures": {}, "notes": str(exc)}
    usual = b.stack.workers[0]
    usual.stop()
    try:
        with _extra_worker(b, LORP_WORK_DIR=str(mount)):
            b.hold("pruning")
            job_id = b.submit()
            b.wait_held(job_id, "pruning")
            filler = fill(mount)
            released = time.monotonic()
            b.release()
            job = b.wait(job_id)
            to_fail = time.monotonic() - released
            objects = len(b.keys(job_id))
            work_left = (mount / job_id).exists()
            filler.unlink()
            nxt = b.wait(b.submit(budget={"blocks": 1}))
    finally:
        usual.start()
        disk.__exit__(None, None, None)
    code = (job.get("error") or {}).get("code")
    ok = job["state"] == "failed" and code == "work_disk_full" and objects == 0
    ok = ok and not work_left and nxt["state"] == "succeeded"
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "state": job["state"],
            "error_code": code,
            "time_to_failed_s": round(to_fail, 2),
            "objects_uploaded": objects,
            "work_dir_left": work_left,
            "next_job": nxt["state"],
        },
        "notes": "work dir on a 64 MiB tmpfs filled at the pruning stage",
    }


def store_slow_and_flapping(b: Bench) -> dict[str, Any]:
    """Latency on every chunk and two resets of the worker's connections to the object store
    mid-upload: retries, then success (or a clean storage_unavailable); never a manifest
    before its objects."""
    proxy = b.svc.s3_proxy
    assert proxy is not None
    b.hold("uploading#2")
    job_id = b.submit(benchmark=SMALL_BENCH)
    b.wait_held(job_id, "uploading")
    refused = proxy.refused
    proxy.delay_s = 0.02
    flapping = proxy.flap([(True, 1.5), (False, 0.5), (True, 1.5)])
    released = time.monotonic()
    b.release()
    try:
        job = b.wait(job_id, timeout=300)
        took = time.monotonic() - released
        flapping.join()
    finally:
        proxy.delay_s = 0.0
        proxy.set_down(False)
    code = (job.get("error") or {}).get("code")
    committed = manifest_matches(b, TENANT_A, job_id)
    manifest_present = f"{TENANT_A}/jobs/{job_id}/manifest.json" in b.keys(job_id)
    ok = (job["state"] == "succeeded" and committed) or (
        job["state"] == "failed" and code == "storage_unavailable" and not manifest_present
    )
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "state": job["state"],
            "error_code": code,
            "upload_s": round(took, 2),
            "connections_reset": proxy.refused - refused,
            "objects_match_manifest": committed,
        },
        "notes": "fault proxy: +20 ms per chunk, down 1.5 s, up 0.5 s, down 1.5 s",
    }


def webhook_receiver_down_slow_up(b: Bench) -> dict[str, Any]:
    """The receiver is down for the whole job, then slow (answers after 3 s, past the 2 s
    timeout) for a while, then up: every state change is delivered, none lost, duplicates
    recognisable by their event id, every signature valid."""
    receiver = WebhookReceiver(free_port(), delay_s=3.0)
    job_id = b.submit(callback_url=receiver.url)
    job = b.wait(job_id)
    down_attempts = len(b.job(job_id)["deliveries"])
    receiver.start()  # slow now
    time.sleep(6)
    slow_posts = len(receiver.posts)
    receiver.delay_s = 0.0
    up_at = time.monotonic()
    states = ("queued", "running", job["state"])
    want = {f"{job_id}.{s}" for s in states}

    def sender_done() -> bool:  # every event acknowledged as the housekeeper saw it
        acked = {d["event_id"] for d in b.job(job_id)["deliveries"] if d["ok"]}
        return want <= acked

    try:
        until("every event acknowledged", sender_done, timeout=300)
        delivered_after = time.monotonic() - up_at
        time.sleep(1.0)  # retries in flight land
    finally:
        receiver.stop()
    delivered = receiver.delivered()
    secret = hmac.new(WEBHOOK_SECRET.encode(), TENANT_A.encode(), hashlib.sha256).hexdigest()
    from jobcore.webhooks import SIGNATURE_HEADER, verify

    signed = all(
        verify(secret.encode(), p.headers[SIGNATURE_HEADER], p.body) for p in receiver.posts
    )
    duplicates = sum(len(v) - 1 for v in delivered.values())
    attempts = b.job(job_id)["deliveries"]
    ok = want == set(delivered) and signed and job["state"] == "succeeded"
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "events": len(want),
            "delivered": len(want & set(delivered)),
            "duplicates_by_event_id": duplicates,
            "attempts_while_down": down_attempts,
            "posts_while_slow": slow_posts,
            "acknowledged_after_up_s": round(delivered_after, 1),
            "attempts_recorded": len(attempts),
            "signatures_valid": signed,
        },
        "notes": "down during the job, answers after 3 s (timeout 2 s: the receiver has it, the "
        "sender retries) for 6 s, then up; duplicates = extra POSTs of an event id",
    }


def api_killed_under_load(b: Bench, clients: int = 8, seconds: float = 8.0) -> dict[str, Any]:
    """Status polls and submissions from several clients while one of the two API processes is
    SIGKILLed: the other keeps serving; the clients see no 5xx, only the killed connections
    fail (and reconnect)."""
    children = _api_workers(b)
    statuses: dict[int, int] = {}
    conn_errors = 0
    lock = threading.Lock()
    stop = threading.Event()
    job_id = b.submit(budget={"blocks": 1})
    body = json.dumps(b.svc.job_body(budget={"blocks": 1})).encode()
    host, port = b.svc.url.removeprefix("http://").split(":")
    headers = {"X-API-Key": _key(b), "Content-Type": "application/json"}
    run_id = f"{time.time():.0f}"

    def client(n: int) -> None:
        nonlocal conn_errors
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if i % 5 == 0:  # a submit, replayed: one job per client, not a growing queue
                    replay = {**headers, "Idempotency-Key": f"api-kill-{n}-{run_id}"}
                    conn.request("POST", "/jobs", body=body, headers=replay)
                else:
                    conn.request("GET", f"/jobs/{job_id}", headers=headers)
                resp = conn.getresponse()
                resp.read()
                with lock:
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
            except (OSError, http.client.HTTPException):
                with lock:
                    conn_errors += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds / 2)
    victim = children[0]
    os.kill(victim, signal.SIGKILL)
    time.sleep(seconds / 2)
    stop.set()
    for t in threads:
        t.join()
    replaced = until(
        "the API process replaced",
        lambda: len(pids := _api_workers(b)) == len(children) and victim not in pids,
        timeout=30,
    )
    fives = sum(n for s, n in statuses.items() if s >= 500)
    served = sum(statuses.values())
    ok = fives == 0 and served > 0 and bool(replaced) and b.client.get("/readyz").status_code == 200
    _cancel_all(b)
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "api_processes": len(children),
            "requests_answered": served,
            "by_status": {str(k): v for k, v in sorted(statuses.items())},
            "5xx": fives,
            "connection_errors": conn_errors,
            "clients": clients,
        },
        "notes": f"{clients} keep-alive clients for {seconds:.0f} s (1 in 5 requests a submit, "
        "replayed with its Idempotency-Key); "
        "one API process SIGKILLed half way; connection errors are the killed process's",
    }


def _api_workers(b: Bench) -> list[int]:
    """Pids of the stack's API worker processes (the launcher's multiprocessing children)."""
    api = b.stack.api
    assert api is not None and api.pid is not None
    kids: list[int] = []
    for task in Path(f"/proc/{api.pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def _key(b: Bench) -> str:
    return str(b.client.headers["X-API-Key"])


def _cancel_all(b: Bench) -> None:
    while True:
        page = b.client.get("/jobs", params={"state": "queued", "limit": 100}).json()
        for job in page["items"]:
            b.client.post(f"/jobs/{job['id']}/cancel")
        if not page["items"]:
            return


def expiry_while_busy(b: Bench) -> dict[str, Any]:
    """The expiry sweep runs (directly, with a clock past the retention) while one job is
    running and one queued: only finished jobs are removed, records and objects."""
    from jobcore.config import Settings
    from jobcore.retention import expire_jobs
    from jobcore.storage import Storage
    from jobcore.store import JobStore

    finished = b.submit(budget={"blocks": 1})
    b.wait(finished)
    b.hold("calibration")
    running = b.submit()
    b.wait_held(running, "calibration")
    queued = b.submit(budget={"blocks": 1})
    saved = {k: os.environ.get(k) for k in b.stack.env}
    os.environ.update(b.stack.env)
    try:
        settings = Settings()  # type: ignore[call-arg]
        store = JobStore.from_settings(settings)
        result = expire_jobs(store, Storage(settings), RETENTION_S, now=time.time() + 3600)
        store.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    gone = b.client.get(f"/jobs/{finished}").status_code == 404 and not b.keys(finished)
    states = {j: b.job(j)["state"] for j in (running, queued)}
    b.release()
    after = {j: b.wait(j)["state"] for j in (running, queued)}
    ok = finished in result.deleted and gone and states == {running: "running", queued: "queued"}
    ok = ok and all(s == "succeeded" for s in after.values())
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "deleted": len(result.deleted),
            "finished_job_gone": gone,
            "during_sweep": list(states.values()),
            "afterwards": list(after.values()),
        },
        "notes": "sweep with a clock 1 h past the job's retention; a held running and a queued job",
    }
