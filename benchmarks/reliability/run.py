"""Reliability scenarios of the service, measured (issue 6).

Starts its own local stack (redis-server with AOF, SeaweedFS, uvicorn, one prefork Celery worker
behind a fault proxy to the object store, the housekeeper)
and runs, against real processes:

* worker pool process SIGKILLed mid-calibration: redelivery, exactly-once result, recovery time
* Redis restarted mid-job: 503 + Retry-After latency while down, no job lost or run twice
* object store down during upload: ``storage_unavailable``, no manifest, resubmission succeeds
* cancel in every stage (queued ... uploading): cancel latency, artifacts left, worker free after
* load: N submissions from C concurrent clients, each sent twice with its Idempotency-Key
  (a retry after a lost answer) plus real retries on errors: accepted exactly once, none lost,
  p50/p99 latency of submit and status
* the hostile-request table of the integration tests: how many 4xx / 5xx
* the fleet (``benchmarks/reliability/fleet.py``, issue 24): two workers sharing 20 jobs of 4
  tenants under a running limit; one of two workers SIGKILLed whole; a worker out of memory
  (RLIMIT_AS); the work disk full (tmpfs); the object store slow and flapping (fault proxy); a
  webhook receiver down, slow, then up; an API process killed under load; expiry while jobs are
  queued and running

Writes ``benchmarks/results/reliability.json`` and prints a Markdown table.

The worker runs ``tests.integration.hold_worker``: the production worker plus a test-only hold
point (a Redis key parks a job at a chosen progress report), used to hit a stage exactly instead
of sleeping. Usage::

    .venv/bin/python benchmarks/reliability/run.py [--submissions 200] [--clients 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine, table, write_result  # noqa: E402
from benchmarks.reliability.fleet import (  # noqa: E402
    FLEET_KEYS,
    MAX_RUNNING,
    RETENTION_S,
    WEBHOOK_SECRET,
    api_killed_under_load,
    expiry_while_busy,
    manifest_matches,
    one_of_two_workers_killed,
    store_slow_and_flapping,
    two_workers_four_tenants,
    webhook_receiver_down_slow_up,
    work_disk_full,
    worker_out_of_memory,
)
from devstack import LocalStack  # noqa: E402
from devstack.faults import FaultProxy  # noqa: E402
from devstack.hostile import BAD_REQUESTS, make_hostile_files  # noqa: E402
from devstack.testbed import (  # noqa: E402
    ARTIFACT_BUCKET,
    CANCEL_POINTS,
    HELD_PREFIX,
    HOLD_KEY,
    INPUT_BUCKET,
    KEY_A,
    KEY_B,
    MAX_MODEL_BYTES,
    SMALL_BENCH,
    TENANT_A,
    TENANT_B,
    Service,
    sample_text,
    until,
    upload_inputs,
)
from tests.tiny_models import build_tiny, tiny_tokenizer  # noqa: E402

KEY_LOAD = "key-load-0123456789"
TENANT_LOAD = "load"
RECOVERY_GOAL_S = 30.0
P99_GOAL_MS = 100.0


# --------------------------------------------------------------------------------------------
# helpers


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


class Bench:
    """The running stack, clients and the uploaded inputs."""

    def __init__(self, stack: LocalStack, svc: Service) -> None:
        self.stack = stack
        self.svc = svc
        self.redis = svc.redis()
        self.client = svc.client(KEY_A)

    def hold(self, point: str) -> None:
        self.redis.set(HOLD_KEY, point, ex=600)

    def release(self) -> None:
        self.redis.delete(HOLD_KEY)

    def wait_held(self, job_id: str, stage: str) -> None:
        until(f"{job_id} held in {stage}", lambda: self.redis.get(HELD_PREFIX + job_id) == stage)

    def submit(self, **overrides: Any) -> str:
        resp = self.client.post("/jobs", json=self.svc.job_body(**overrides))
        resp.raise_for_status()
        return str(resp.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/jobs/{job_id}").raise_for_status().json())

    def wait(self, job_id: str, until: Callable[[dict[str, Any]], bool] | None = None,
             timeout: float = 180.0) -> dict[str, Any]:  # fmt: skip
        if until is None:
            return self.svc.wait(self.client, job_id, timeout=timeout)
        return self.svc.wait(self.client, job_id, until=until, timeout=timeout)

    def keys(self, job_id: str, tenant: str = TENANT_A) -> list[str]:
        return self.svc.artifact_keys(tenant, job_id)


# --------------------------------------------------------------------------------------------
# scenarios: each returns {"outcome": "pass"|"fail", "figures": {...}, "notes": str}


def worker_sigkill(b: Bench) -> dict[str, Any]:
    b.hold("calibration")
    job_id = b.submit(benchmark=SMALL_BENCH)
    b.wait_held(job_id, "calibration")
    worker = b.stack.workers[0]
    assert worker.pid is not None
    pool = _children(worker.pid)
    for pid in pool:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    b.release()
    b.wait(job_id, until=lambda j: j["attempts"] >= 2, timeout=120)
    redelivered = time.monotonic() - killed
    job = b.wait(job_id)
    done = time.monotonic() - killed
    manifest_ok = manifest_matches(b, TENANT_A, job_id)
    ok = job["state"] == "succeeded" and job["attempts"] == 2 and manifest_ok
    ok = ok and redelivered <= RECOVERY_GOAL_S
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "pool_processes_killed": len(pool),
            "time_to_redelivery_s": round(redelivered, 2),
            "time_to_success_s": round(done, 2),
            "final_state": job["state"],
            "attempts": job["attempts"],
            "objects_match_manifest": manifest_ok,
            "worker_alive_after": worker.alive(),
        },
        "notes": f"goal: redelivered within {RECOVERY_GOAL_S:.0f} s; one manifest, no strays",
    }


def redis_restart(b: Bench) -> dict[str, Any]:
    b.hold("calibration")
    running = b.submit()
    b.wait_held(running, "calibration")
    queued = b.submit(budget={"blocks": 1})
    answers: list[dict[str, Any]] = []
    redis = b.stack.redis
    down = time.monotonic()
    redis.stop()
    try:
        for method, path in (
            ("GET", f"/jobs/{running}"),
            ("GET", "/jobs"),
            ("POST", "/jobs"),
            ("POST", f"/jobs/{queued}/cancel"),
            ("GET", "/readyz"),
        ):
            kwargs: dict[str, Any] = {"json": b.svc.job_body()} if path == "/jobs" else {}
            start = time.monotonic()
            resp = b.client.request(method, path, **kwargs)
            answers.append(
                {
                    "request": f"{method} {path.replace(running, '{id}').replace(queued, '{id}')}",
                    "status": resp.status_code,
                    "retry_after": resp.headers.get("Retry-After"),
                    "latency_ms": _ms(time.monotonic() - start),
                }
            )
    finally:
        redis.start()
    downtime = time.monotonic() - down
    until("API ready", lambda: b.client.get("/readyz").status_code == 200, timeout=60)
    ready_after = time.monotonic() - down
    b.release()
    jobs = [b.wait(running), b.wait(queued)]
    ok = all(a["status"] == 503 and a["retry_after"] for a in answers)
    ok = ok and all(a["latency_ms"] is not None and a["latency_ms"] < 2000 for a in answers)
    ok = ok and all(j["state"] == "succeeded" and j["attempts"] == 1 for j in jobs)
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "answers_while_down": answers,
            "max_503_latency_ms": max(a["latency_ms"] for a in answers),
            "redis_downtime_s": round(downtime, 2),
            "api_ready_after_s": round(ready_after, 2),
            "jobs": [{"state": j["state"], "attempts": j["attempts"]} for j in jobs],
        },
        "notes": "graceful restart (SIGTERM, AOF everysec); a running and a queued job",
    }


def store_down(b: Bench) -> dict[str, Any]:
    b.hold("saving")
    body = {"benchmark": SMALL_BENCH}
    job_id = b.submit(**body)
    b.wait_held(job_id, "saving")
    s3 = b.stack.s3
    s3.stop()
    try:
        released = time.monotonic()
        b.release()
        job = b.wait(job_id, timeout=300)
        to_fail = time.monotonic() - released
        ready = b.client.get("/readyz")
    finally:
        s3.start()
    keys = b.keys(job_id)
    again = b.submit(**body)
    second = b.wait(again)
    code = (job.get("error") or {}).get("code")
    ok = job["state"] == "failed" and code == "storage_unavailable"
    ok = ok and f"{TENANT_A}/jobs/{job_id}/manifest.json" not in keys
    ok = ok and second["state"] == "succeeded" and ready.status_code == 503
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "state": job["state"],
            "error_code": code,
            "time_to_failed_s": round(to_fail, 2),
            "readyz_while_down": ready.status_code,
            "objects_left_after": len(keys),
            "manifest_written": f"{TENANT_A}/jobs/{job_id}/manifest.json" in keys,
            "resubmission": second["state"],
        },
        "notes": "store stopped after the checkpoint was saved, before the upload",
    }


def cancel_per_stage(b: Bench) -> dict[str, Any]:
    rows = []
    # queued: behind a parked job
    b.hold("calibration")
    first = b.submit()
    b.wait_held(first, "calibration")
    second = b.submit(budget={"blocks": 1})
    start = time.monotonic()
    state = b.client.post(f"/jobs/{second}/cancel").json()["state"]
    rows.append(
        {
            "stage": "queued",
            "state": state,
            "cancel_latency_ms": _ms(time.monotonic() - start),
            "objects_left": len(b.keys(second)),
        }
    )
    b.client.post(f"/jobs/{first}/cancel")
    b.wait(first)
    b.release()
    for point in CANCEL_POINTS:
        stage = point.partition("#")[0]
        b.hold(point)
        job_id = b.submit(benchmark=SMALL_BENCH)
        b.wait_held(job_id, stage)
        partial = len(b.keys(job_id))
        start = time.monotonic()
        b.client.post(f"/jobs/{job_id}/cancel").raise_for_status()
        job = b.wait(job_id, timeout=60)
        rows.append(
            {
                "stage": stage,
                "state": job["state"],
                "cancel_latency_ms": _ms(time.monotonic() - start),
                "objects_before_cancel": partial,
                "objects_left": len(b.keys(job_id)),
                "work_dir_left": (b.stack.root / "work" / job_id).exists(),
            }
        )
        b.release()
    nxt = b.wait(b.submit(budget={"blocks": 1}))
    ok = all(r["state"] == "cancelled" and r["objects_left"] == 0 for r in rows)
    ok = ok and not any(r.get("work_dir_left") for r in rows) and nxt["state"] == "succeeded"
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "stages": rows,
            "max_cancel_latency_ms": max(r["cancel_latency_ms"] for r in rows),
            "next_job_after_cancels": nxt["state"],
        },
        "notes": "cancel_latency = POST cancel until the job reads 'cancelled'",
    }


class LoadClient:
    """One keep-alive HTTP/1.1 connection of a load client, on the standard library's
    ``http.client``: the load generator shares the 2 cores with the stack it measures; with 20
    client threads httpx spent ~2 ms of CPU per request here, http.client 0.25 ms."""

    def __init__(self, url: str, api_key: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        self.headers = {"X-API-Key": api_key, "Content-Type": "application/json"}

    def request(
        self, method: str, path: str, body: bytes | None = None, key: str | None = None
    ) -> tuple[int, bytes]:
        """Status and body; a connection error closes it (the next request reconnects)."""
        headers = self.headers if key is None else {**self.headers, "Idempotency-Key": key}
        try:
            self.conn.request(method, path, body=body, headers=headers)
            resp = self.conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load(b: Bench, submissions: int, clients: int) -> dict[str, Any]:
    # Park the worker on one job so the queue holds the load (the API, Redis and the broker
    # are what is measured), then cancel everything the load created.
    b.hold("downloading")
    submit_lat: list[float] = []
    replay_lat: list[float] = []
    status_lat: list[float] = []
    lock = threading.Lock()
    outcomes: dict[str, list[str]] = {}
    errors: dict[str, int] = {}
    retries = 0
    per_client = submissions // clients
    # inputs the load tenant may read (the local model, the operator's corpus): tenant A's
    # uploads are not granted to it
    body = json.dumps(
        b.svc.job_body(
            model=str(b.svc.model_local),
            calibration="corpus:handbook",
            evaluation=None,
            budget={"blocks": 1},
        )
    ).encode()

    def run_client(n: int) -> None:
        nonlocal retries
        c = LoadClient(b.svc.url, KEY_LOAD)
        mine: list[str] = []
        for i in range(per_client):
            key = f"load-{n}-{i}-{uuid.uuid4().hex[:8]}"
            ids: list[str] = []
            # send, then send again as a client would after losing the answer
            for attempt in range(2):
                for _ in range(5):  # real retries on errors, same key
                    start = time.perf_counter()
                    try:
                        status, data = c.request("POST", "/jobs", body, key=key)
                    except (OSError, http.client.HTTPException) as e:
                        with lock:
                            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                            retries += 1
                        continue
                    took = time.perf_counter() - start
                    with lock:
                        (submit_lat if attempt == 0 else replay_lat).append(took)
                    if status == 202:
                        ids.append(json.loads(data)["id"])
                        break
                    with lock:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                        retries += 1
                    time.sleep(0.05)
            with lock:
                outcomes[key] = ids
            if ids:
                mine.append(ids[0])
        for job_id in mine:
            start = time.perf_counter()
            status, _ = c.request("GET", f"/jobs/{job_id}")
            with lock:
                status_lat.append(time.perf_counter() - start)
                if status != 200:
                    errors["status"] = errors.get("status", 0) + 1
        c.close()

    # Service time without queueing: one client, one request at a time.
    solo_submit: list[float] = []
    solo_status: list[float] = []
    solo: set[str] = set()
    c = LoadClient(b.svc.url, KEY_LOAD)
    for _ in range(30):
        start = time.perf_counter()
        status, data = c.request("POST", "/jobs", body)
        solo_submit.append(time.perf_counter() - start)
        assert status == 202, data
        job_id = json.loads(data)["id"]
        solo.add(job_id)
        start = time.perf_counter()
        status, data = c.request("GET", f"/jobs/{job_id}")
        solo_status.append(time.perf_counter() - start)
        assert status == 200, data
    c.close()

    load_before = os.getloadavg()
    cpu_before = _cpu_seconds()
    started = time.monotonic()
    threads = [threading.Thread(target=run_client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    generator_cpu = _cpu_seconds() - cpu_before
    load_after = os.getloadavg()

    # Exactly once: every key got one id (twice the same), ids distinct, all listed.
    distinct = {ids[0] for ids in outcomes.values() if ids}
    replays_consistent = all(len(ids) == 2 and ids[0] == ids[1] for ids in outcomes.values())
    listed: set[str] = set()
    with httpx.Client(base_url=b.svc.url, headers={"X-API-Key": KEY_LOAD}, timeout=10) as c:
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = c.get("/jobs", params=params).json()
            listed |= {j["id"] for j in page["items"]}
            cursor = page["next_cursor"]
            if not cursor:
                break
        for job_id in listed:
            c.post(f"/jobs/{job_id}/cancel")
    b.release()
    expected = per_client * clients
    listed -= solo  # the single-client baseline's jobs
    ok = len(distinct) == expected and replays_consistent and listed == distinct
    p99_submit = _pct(submit_lat, 99)
    p99_status = _pct(status_lat, 99)
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {
            "submissions": expected,
            "clients": clients,
            "accepted_distinct_jobs": len(distinct),
            "jobs_stored_for_tenant": len(listed),
            "lost": len(distinct - listed),
            "duplicates": len(listed) - len(distinct) if listed >= distinct else None,
            "replays_returned_same_job": replays_consistent,
            "error_retries": retries,
            "errors": errors,
            "submit_p50_ms": _ms(_pct(submit_lat, 50)),
            "submit_p99_ms": _ms(p99_submit),
            "replay_p50_ms": _ms(_pct(replay_lat, 50)),
            "replay_p99_ms": _ms(_pct(replay_lat, 99)),
            "status_p50_ms": _ms(_pct(status_lat, 50)),
            "status_p99_ms": _ms(p99_status),
            "single_client_submit_p50_ms": _ms(_pct(solo_submit, 50)),
            "single_client_submit_p99_ms": _ms(_pct(solo_submit, 99)),
            "single_client_status_p50_ms": _ms(_pct(solo_status, 50)),
            "single_client_status_p99_ms": _ms(_pct(solo_status, 99)),
            "submit_mean_ms": _ms(statistics.fmean(submit_lat)) if submit_lat else None,
            "wall_s": round(wall, 2),
            "requests_per_s": round(
                (len(submit_lat) + len(replay_lat) + len(status_lat)) / wall, 1
            ),
            "load_generator_cpu_s": round(generator_cpu, 2),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "p99_goal_met": bool(
                p99_submit is not None
                and p99_status is not None
                and max(p99_submit, p99_status) * 1000 < P99_GOAL_MS
            ),
        },
        "notes": (
            f"each submission sent twice with its Idempotency-Key; goal p99 < {P99_GOAL_MS:.0f} "
            f"ms; {clients} client threads (http.client, one keep-alive connection each) in the "
            "runner process, on the same 2 cores as the stack"
        ),
    }


def bad_input(b: Bench) -> dict[str, Any]:
    make_hostile_files(b.svc.local_root)
    counts: dict[str, int] = {}
    unexpected = []
    for bad in BAD_REQUESTS:
        headers: dict[str, Any] = {"Content-Type": "application/json", **bad.headers}
        if bad.raw is not None:
            content: Any = bad.raw() if callable(bad.raw) else bad.raw
        else:
            assert bad.body is not None
            content = json.dumps(bad.body(b.svc)).encode()
        request = b.client.build_request("POST", "/jobs", content=content, headers=headers)
        if bad.drop_key:
            del request.headers["X-API-Key"]
        status = b.client.send(request).status_code
        bucket = f"{status // 100}xx"
        counts[bucket] = counts.get(bucket, 0) + 1
        if status not in bad.status:
            unexpected.append({"name": bad.name, "status": status, "expected": bad.status})
    ok = counts.get("5xx", 0) == 0 and counts.get("2xx", 0) == 0 and not unexpected
    return {
        "outcome": "pass" if ok else "fail",
        "figures": {"requests": len(BAD_REQUESTS), "by_class": counts, "unexpected": unexpected},
        "notes": "the table of devstack.hostile (tests/integration/test_service_api.py asserts it)",
    }


# --------------------------------------------------------------------------------------------
# stack and report


def _setup(root: Path) -> tuple[LocalStack, Path, Path]:
    local_root = root / "local-root"
    local_root.mkdir(parents=True)
    corpus = local_root / "corpus.txt"
    corpus.write_text(
        sample_text("calibration/debian-handbook.en.txt", "calibration text. ", 20_000)
    )
    model_dir = local_root / "tiny-llama"
    build_tiny("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    stack = LocalStack(
        root / "stack",
        bucket=ARTIFACT_BUCKET,
        extra_buckets=[INPUT_BUCKET],
        api_keys={KEY_A: TENANT_A, KEY_B: TENANT_B, KEY_LOAD: TENANT_LOAD, **FLEET_KEYS},
        local_roots=[local_root],
        corpora={"handbook": corpus},
        settings={
            "LORP_MAX_MODEL_BYTES": str(MAX_MODEL_BYTES),
            "LORP_TENANT_MAX_RUNNING": str(MAX_RUNNING),
            "LORP_JOB_RETENTION_SECONDS": str(RETENTION_S),
            "LORP_WEBHOOK_ALLOWED_HOSTS": json.dumps(["127.0.0.1"]),
            "LORP_WEBHOOK_ALLOW_PRIVATE": "true",
            "LORP_WEBHOOK_ALLOW_HTTP": "true",
            "LORP_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "LORP_WEBHOOK_BACKOFF_SECONDS": "0.5",
            "LORP_WEBHOOK_BACKOFF_MAX_SECONDS": "4",
            "LORP_WEBHOOK_TIMEOUT_SECONDS": "2",
        },
        worker_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        worker_app="tests.integration.hold_worker",
        housekeeper=True,
        workers=0,  # started behind the fault proxy (main)
    )
    return stack, local_root, model_dir


def _headline(name: str, figures: dict[str, Any]) -> str:
    f = figures
    if name == "worker_sigkill_mid_calibration":
        return (
            f"redelivered {f['time_to_redelivery_s']} s after SIGKILL, succeeded at "
            f"{f['time_to_success_s']} s, attempts {f['attempts']}, "
            f"objects = manifest: {f['objects_match_manifest']}"
        )
    if name == "redis_restart_mid_job":
        codes = sorted({a["status"] for a in f["answers_while_down"]})
        return (
            f"while down: {codes} in <= {f['max_503_latency_ms']} ms with Retry-After; "
            f"ready {f['api_ready_after_s']} s after stop; jobs "
            + ", ".join(f"{j['state']}/{j['attempts']} run" for j in f["jobs"])
        )
    if name == "object_store_down_during_upload":
        return (
            f"{f['state']} ({f['error_code']}) {f['time_to_failed_s']} s after the upload began; "
            f"manifest written: {f['manifest_written']}; resubmission {f['resubmission']}"
        )
    if name == "cancel_in_every_stage":
        stages = f["stages"]
        ok = sum(r["state"] == "cancelled" for r in stages)
        return (
            f"{ok}/{len(stages)} stages cancelled, objects left "
            f"{sum(r['objects_left'] for r in stages)}, max latency {f['max_cancel_latency_ms']} "
            f"ms, next job {f['next_job_after_cancels']}"
        )
    if name == "load_idempotent_submissions":
        return (
            f"{f['accepted_distinct_jobs']}/{f['submissions']} accepted once, lost {f['lost']}, "
            f"submit p50/p99 {f['submit_p50_ms']}/{f['submit_p99_ms']} ms, status p50/p99 "
            f"{f['status_p50_ms']}/{f['status_p99_ms']} ms ({f['requests_per_s']} req/s; one "
            f"client alone: submit {f['single_client_submit_p50_ms']}/"
            f"{f['single_client_submit_p99_ms']} ms), {f['error_retries']} error retries, "
            f"load average {f['loadavg_before'][0]}"
        )
    if name == "hostile_requests":
        return f"{f['requests']} requests: {f['by_class']}, unexpected {len(f['unexpected'])}"
    if name == "two_workers_20_jobs_4_tenants":
        return (
            f"{f['succeeded']}/{f['jobs']} succeeded, max attempts {f['max_attempts']}, max "
            f"running per tenant {f['max_running_per_tenant_seen']}, median finish position "
            f"by tenant {f['median_finish_position_by_tenant']}, {f['wall_s']} s"
        )
    if name == "one_of_two_workers_sigkilled":
        return (
            f"resumed on the other worker {f['resumed_on_the_other_worker_s']} s after SIGKILL, "
            f"succeeded at {f['succeeded_after_kill_s']} s, attempts {f['attempts']}, "
            f"objects = manifest: {f['objects_match_manifest']}"
        )
    if name in ("worker_out_of_memory", "work_disk_full"):
        return (
            f"{f['state']} ({f['error_code']}), next job {f.get('next_job')}"
            + (f", RLIMIT_AS {f['rlimit_as_mb']} MB" if "rlimit_as_mb" in f else "")
            + (f", objects uploaded {f['objects_uploaded']}" if "objects_uploaded" in f else "")
        )
    if name == "object_store_slow_and_flapping":
        return (
            f"{f['state']} ({f['error_code']}) after {f['upload_s']} s, "
            f"{f['connections_reset']} connections reset, objects = manifest: "
            f"{f['objects_match_manifest']}"
        )
    if name == "webhook_receiver_down_slow_up":
        return (
            f"{f['delivered']}/{f['events']} events delivered "
            f"(all acknowledged {f['acknowledged_after_up_s']} s after it came up), duplicates "
            f"{f['duplicates_by_event_id']} (same id), {f['attempts_recorded']} attempts "
            f"recorded, signatures valid: {f['signatures_valid']}"
        )
    if name == "api_process_killed_under_load":
        return (
            f"{f['requests_answered']} answered, 5xx {f['5xx']}, connection errors "
            f"{f['connection_errors']} ({f['api_processes']} API processes, one SIGKILLed)"
        )
    if name == "expiry_while_jobs_queued_and_running":
        return (
            f"deleted {f['deleted']}, finished job gone: {f['finished_job_gone']}; during the "
            f"sweep {f['during_sweep']}, afterwards {f['afterwards']}"
        )
    return json.dumps(f)[:200]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the stack directory")
    parser.add_argument("--only", nargs="*", help="run only these scenarios (by name)")
    parser.add_argument("--out", default="reliability", help="result name under results/")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="lorp-reliability-"))
    scenarios: list[tuple[str, Callable[[Bench], dict[str, Any]]]] = [
        ("worker_sigkill_mid_calibration", worker_sigkill),
        ("redis_restart_mid_job", redis_restart),
        ("object_store_down_during_upload", store_down),
        ("cancel_in_every_stage", cancel_per_stage),
        (
            "load_idempotent_submissions",
            lambda b: load(b, args.submissions, args.clients),
        ),
        ("hostile_requests", bad_input),
        ("two_workers_20_jobs_4_tenants", two_workers_four_tenants),
        ("one_of_two_workers_sigkilled", one_of_two_workers_killed),
        ("worker_out_of_memory", worker_out_of_memory),
        ("work_disk_full", work_disk_full),
        ("object_store_slow_and_flapping", store_slow_and_flapping),
        ("webhook_receiver_down_slow_up", webhook_receiver_down_slow_up),
        ("api_process_killed_under_load", api_killed_under_load),
        ("expiry_while_jobs_queued_and_running", expiry_while_busy),
    ]
    if args.only:
        scenarios = [(n, f) for n, f in scenarios if n in args.only]
    results: list[dict[str, Any]] = []
    load_start = os.getloadavg()
    started = time.monotonic()
    try:
        stack, local_root, model_dir = _setup(root)
        with stack, FaultProxy(urlsplit(stack.s3.endpoint_url).port or 0) as proxy:
            # the workers reach the object store through the fault proxy
            stack.worker_env["LORP_S3_ENDPOINT_URL"] = proxy.url
            stack.add_worker()
            svc = upload_inputs(stack, local_root, model_dir)
            svc.s3_proxy = proxy
            bench = Bench(stack, svc)
            for name, fn in scenarios:
                t0 = time.monotonic()
                print(f"-- {name}", flush=True)
                try:
                    res = fn(bench)
                except Exception as e:
                    traceback.print_exc()
                    res = {"outcome": "error", "figures": {}, "notes": f"{type(e).__name__}: {e}"}
                finally:
                    bench.release()
                res = {"scenario": name, **res, "seconds": round(time.monotonic() - t0, 1)}
                results.append(res)
                print(f"   {res['outcome']}: {json.dumps(res['figures'])[:300]}", flush=True)
    finally:
        if args.keep:
            print(f"stack directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    data = {
        "machine": {
            **machine(),
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "note": "2 cores shared with other jobs; worker OMP_NUM_THREADS=1",
        },
        "total_seconds": round(time.monotonic() - started, 1),
        "results": results,
    }
    path = write_result(args.out, data)
    rows = [
        [
            r["scenario"],
            r["outcome"],
            _headline(r["scenario"], r["figures"]) if r["figures"] else r["notes"],
        ]
        for r in results
    ]
    print()
    print(table(["scenario", "outcome", "figures"], rows))
    print(f"\nwritten: {path}")
    return 0 if all(r["outcome"] in ("pass", "skipped") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
