"""The local process stack: real redis-server and SeaweedFS processes, real teardown."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from botocore.exceptions import ClientError

from devstack.stack import (
    CeleryWorker,
    LocalStack,
    ManagedProcess,
    RedisServer,
    SeaweedS3,
    StackError,
    free_port,
    process_group_alive,
    tcp_open,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state owned by ``pid`` (from /proc, no external tools)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("weed"), buckets=["devstack-test"])
    server.start()
    yield server
    server.stop()


def test_seaweed_round_trip_and_presigned_get(seaweed: SeaweedS3) -> None:
    s3 = seaweed.client()
    s3.put_object(Bucket="devstack-test", Key="t/a.txt", Body=b"hello")
    assert s3.get_object(Bucket="devstack-test", Key="t/a.txt")["Body"].read() == b"hello"
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": "devstack-test", "Key": "t/a.txt"}, ExpiresIn=60
    )
    assert httpx.get(url).content == b"hello"


def test_seaweed_enforces_signatures(seaweed: SeaweedS3) -> None:
    seaweed.client().put_object(Bucket="devstack-test", Key="secret.txt", Body=b"x")

    with pytest.raises(ClientError) as wrong_secret:
        seaweed.client(secret_key=seaweed.secret_key + "x").list_buckets()
    assert wrong_secret.value.response["Error"]["Code"] == "SignatureDoesNotMatch"

    with pytest.raises(ClientError) as unknown_key:
        seaweed.client(access_key="NOSUCHKEY", secret_key="whatever").get_object(
            Bucket="devstack-test", Key="secret.txt"
        )
    assert unknown_key.value.response["Error"]["Code"] == "InvalidAccessKeyId"

    anonymous = httpx.get(f"{seaweed.endpoint_url}/devstack-test/secret.txt")
    assert anonymous.status_code == 403
    anonymous_put = httpx.put(f"{seaweed.endpoint_url}/devstack-test/evil.txt", content=b"x")
    assert anonymous_put.status_code == 403
    keys = [
        o["Key"]
        for o in seaweed.client().list_objects_v2(Bucket="devstack-test").get("Contents", [])
    ]
    assert "evil.txt" not in keys


def test_seaweed_listens_only_on_its_pinned_ports(seaweed: SeaweedS3) -> None:
    assert seaweed.pid is not None
    listening = _listening_ports(seaweed.pid)
    assert seaweed.s3_port in listening
    assert listening <= set(seaweed.ports.values()), listening - set(seaweed.ports.values())
    assert len(set(seaweed.ports.values())) == len(seaweed.ports)


def test_seaweed_rejects_bad_bucket_name(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="bucket"):
        SeaweedS3(tmp_path, buckets=["b1"])


def test_redis_aof_survives_graceful_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    try:
        server.start()
        client = redis.Redis.from_url(server.url)
        client.set("job:1", "queued")
        client.close()
        port = server.port
        server.restart()
        assert server.port == port
        client = redis.Redis.from_url(server.url)
        assert client.get("job:1") == b"queued"
        client.close()
        assert list((tmp_path / "redis").rglob("*.aof")), "no AOF file written"
        assert not (tmp_path / "redis" / "dump.rdb").exists(), "RDB snapshots should be off"
    finally:
        server.stop()


def test_redis_aof_survives_sigkill(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendfsync="always")
    try:
        server.start()
        client = redis.Redis.from_url(server.url)
        client.hset("job:2", mapping={"state": "running", "stage": "calibration"})
        client.close()
        server.kill()  # no shutdown hook runs: only the AOF can bring the data back
        assert not server.alive()
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.hgetall("job:2") == {b"state": b"running", b"stage": b"calibration"}
        client.close()
    finally:
        server.stop()


def test_redis_without_aof_loses_data_on_restart(tmp_path: Path) -> None:
    """Control for the tests above: with AOF and RDB both off, a restart really loses the data."""
    server = RedisServer(tmp_path / "redis", appendonly=False)
    try:
        server.start()
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        client.close()
        server.restart()
        client = redis.Redis.from_url(server.url)
        assert client.get("k") is None
        client.close()
    finally:
        server.stop()


class NeverReady(ManagedProcess):
    def is_ready(self) -> bool:
        return False


def test_start_failure_reports_exit_code_and_log_tail(tmp_path: Path) -> None:
    proc = NeverReady(
        [sys.executable, "-c", "print('boom: bad config', flush=True); raise SystemExit(3)"],
        log_path=tmp_path / "p.log",
    )
    with pytest.raises(StackError, match=r"(?s)code 3.*boom: bad config"):
        proc.start()


def test_readiness_timeout_stops_the_process(tmp_path: Path) -> None:
    proc = NeverReady(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        log_path=tmp_path / "p.log",
        start_timeout=1.0,
    )
    with pytest.raises(StackError, match="did not become ready"):
        proc.start()
    assert proc.pgid is not None
    assert not process_group_alive(proc.pgid)


def test_stop_escalates_to_sigkill_and_reaches_grandchildren(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        print(f"CHILD={child.pid}.", flush=True)
        time.sleep(600)
        """
    )
    proc = ManagedProcess([sys.executable, "-c", script], log_path=tmp_path / "p.log")
    proc.start()
    deadline = time.monotonic() + 20
    while not (found := re.search(r"^CHILD=(\d+)\.$", proc.log_text(), re.M)):
        assert time.monotonic() < deadline, proc.log_text()
        time.sleep(0.1)
    child_pid = int(found.group(1))
    assert proc.pgid is not None
    started = time.monotonic()
    proc.stop(timeout=1.0)
    assert time.monotonic() - started < 15
    assert not proc.alive()
    assert not process_group_alive(proc.pgid)
    stat = Path(f"/proc/{child_pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("how", ["exit", "crash"])
def test_children_die_with_the_parent(tmp_path: Path, how: str) -> None:
    """Normal exit runs the atexit hook; an abrupt os._exit relies on the parent-death signal."""
    ending = "sys.exit(0)" if how == "exit" else "os._exit(0)"
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from devstack import RedisServer
        server = RedisServer(Path({str(tmp_path / "redis")!r}))
        server.start()
        print(server.pgid, server.port, flush=True)
        {ending}
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pgid, port = (int(x) for x in out.stdout.split())
    deadline = time.monotonic() + 15
    while process_group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_group_alive(pgid)
    assert not tcp_open(port)


def test_local_stack_settings_and_teardown(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    stack = LocalStack(
        tmp_path / "stack",
        api=False,
        workers=0,
        local_roots=[tmp_path],
        corpora={"tiny": corpus},
    )
    with stack:
        env = stack.env
        assert env["LORP_S3_ENDPOINT_URL"] == stack.s3.endpoint_url
        assert env["LORP_REDIS_URL"] == stack.redis.url
        r = redis.Redis.from_url(env["LORP_BROKER_URL"])
        assert r.ping()
        r.close()
        s3 = stack.s3_client()
        assert env["LORP_S3_BUCKET"] in {b["Name"] for b in s3.list_buckets()["Buckets"]}
        procs = stack.processes()
        groups = [p.pgid for p in procs]
        ports = [stack.redis.port, *stack.s3.ports.values()]
        if importlib.util.find_spec("pydantic_settings") is not None:
            from jobcore.config import Settings

            names = {f"LORP_{name.upper()}" for name in Settings.model_fields}
            assert set(env) <= names, set(env) - names
            old = {k: os.environ.get(k) for k in env}
            try:
                os.environ.update(env)
                settings = Settings()  # type: ignore[call-arg]  # valid configuration from env
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            assert settings.s3_bucket == stack.bucket
            assert settings.corpora["tiny"] == corpus.resolve()
    for group in groups:
        assert group is not None
        assert not process_group_alive(group)
    assert not any(tcp_open(p) for p in ports)


def test_local_stack_stops_what_it_started_when_a_later_part_fails(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "stack", api=False, workers=0)

    def broken_start(*args: object, **kwargs: object) -> ManagedProcess:
        raise StackError("simulated failure")

    stack.s3.start = broken_start  # type: ignore[method-assign]
    with pytest.raises(StackError, match="simulated"), stack:
        pass
    assert stack.redis.pgid is not None
    assert not process_group_alive(stack.redis.pgid)


@pytest.mark.skipif(
    importlib.util.find_spec("service.main") is None
    or importlib.util.find_spec("worker.celery_app") is None,
    reason="service.main / worker.celery_app not written yet",
)
def test_full_stack_api_and_worker(tmp_path: Path) -> None:
    with LocalStack(tmp_path / "stack", workers=1) as stack:
        health = httpx.get(f"{stack.api_url}/healthz")
        assert health.status_code == 200
        ready = httpx.get(f"{stack.api_url}/readyz")
        assert ready.status_code == 200
        unauth = httpx.get(f"{stack.api_url}/jobs")
        assert unauth.status_code == 401
        listed = httpx.get(f"{stack.api_url}/jobs", headers={"X-API-Key": stack.api_key})
        assert listed.status_code == 200
        worker = stack.workers[0]
        assert worker.alive()
        groups = [p.pgid for p in stack.processes()]
        worker.kill()
        assert not worker.alive()
        stack.add_worker()
        groups.append(stack.workers[-1].pgid)
    for group in groups:
        assert group is not None
        assert not process_group_alive(group)


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    assert 1024 <= port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # raises OSError when the port is taken
        assert sock.getsockname() == ("127.0.0.1", port)


_PROBE_APP = """
import os, time
from celery import Celery

app = Celery("probe", broker=os.environ["LORP_BROKER_URL"])
app.conf.update(task_default_queue="devstack-probe", worker_hijack_root_logger=False,
                task_acks_late=True, worker_prefetch_multiplier=1)


@app.task(name="probe.mark")
def mark(key: str, seconds: float = 0.0) -> None:
    import redis
    r = redis.Redis.from_url(os.environ["LORP_BROKER_URL"])
    r.set(key + ":started", os.getpid())
    time.sleep(seconds)
    r.set(key, os.getpid())
"""


def test_celery_worker_runs_tasks_and_dies_with_kill(tmp_path: Path) -> None:
    """A stand-in Celery app (independent of worker.celery_app) run by CeleryWorker."""
    from celery import Celery

    (tmp_path / "probe_app.py").write_text(_PROBE_APP)
    redis_server = RedisServer(tmp_path / "redis")
    with redis_server:
        env = {"LORP_BROKER_URL": redis_server.url, "PYTHONPATH": str(tmp_path)}
        worker = CeleryWorker(
            env, log_path=tmp_path / "worker.log", app="probe_app", queues=["devstack-probe"]
        )
        client = Celery("sender", broker=redis_server.url)
        r = redis.Redis.from_url(redis_server.url)
        try:
            worker.start()
            client.send_task("probe.mark", args=["done"], queue="devstack-probe")
            deadline = time.monotonic() + 60
            while r.get("done") is None:
                assert time.monotonic() < deadline, worker.log_text()
                time.sleep(0.2)
            pool_pid = int(r.get("done") or 0)
            assert pool_pid != worker.pid  # ran in a prefork child, not the main process

            client.send_task("probe.mark", args=["slow", 600.0], queue="devstack-probe")
            while r.get("slow:started") is None:
                assert time.monotonic() < deadline + 60, worker.log_text()
                time.sleep(0.2)
            child = int(r.get("slow:started") or 0)
            assert worker.pgid is not None
            worker.kill()  # main process and the busy pool child go together
            assert not process_group_alive(worker.pgid)
            stat = Path(f"/proc/{child}/stat")
            assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
        finally:
            worker.stop()
            r.close()
            client.close()


def _children_of(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = re.search(r"^PPid:\s*(\d+)", status, re.M)
        if ppid and int(ppid.group(1)) == parent and not _is_zombie(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_ctrl_c_twice_still_stops_everything(tmp_path: Path) -> None:
    """``python -m devstack`` (what the demo uses) under Ctrl-C, pressed twice."""
    root = tmp_path / "sigstack"
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack", str(root), "--no-api", "--workers", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
            assert time.monotonic() < deadline, "".join(lines)
        children = _children_of(proc.pid)
        assert len(children) == 3, children  # redis-server, weed and the housekeeper
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # impatient second Ctrl-C during teardown
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 130, "".join(lines) + output
        assert "please wait" in output
        assert [pid for pid in children if not _is_zombie(pid)] == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
