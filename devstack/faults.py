"""Faults for the tests and the reliability runner. :class:`FaultProxy`: a TCP proxy between a
client and a server (the workers and the object store) that adds latency per forwarded chunk and
has a ``down`` switch that resets every open connection and refuses new ones until it is
switched back; point the client's endpoint at :attr:`FaultProxy.url`. :func:`small_disk` and
:func:`fill`: a small tmpfs to run a worker's work directory on, and filling it.

Standard library only."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

LOOPBACK = "127.0.0.1"


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed or flapping peer would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """Forwards ``LOOPBACK:port`` to ``upstream``; ``delay_s`` is added before every chunk
    forwarded in either direction; while ``down``, connections are reset."""

    def __init__(self, upstream_port: int, *, upstream_host: str = LOOPBACK) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay_s = 0.0
        self._down = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = int(self._listener.getsockname()[1])
        self.accepted = 0
        self.refused = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._drop_all()

    @property
    def down(self) -> bool:
        return self._down.is_set()

    def set_down(self, down: bool) -> None:
        """Down: reset every open connection now and every new one until set up again."""
        if down:
            self._down.set()
            self._drop_all()
        else:
            self._down.clear()

    def flap(self, pattern: list[tuple[bool, float]]) -> threading.Thread:
        """Run ``[(down, seconds), ...]`` in the background (ends up)."""

        def run() -> None:
            for down, seconds in pattern:
                self.set_down(down)
                time.sleep(seconds)
            self.set_down(False)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _reset(conn)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down.is_set():
                self.refused += 1
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                self.refused += 1
                _reset(client)
                continue
            self.accepted += 1
            server.settimeout(None)
            with self._lock:
                self._conns.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                if self.delay_s:
                    time.sleep(self.delay_s)
                if self._down.is_set():
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            if self._down.is_set():
                _reset(src)
                _reset(dst)
            else:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        sock.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class MountError(RuntimeError):
    """A tmpfs could not be mounted (needs root or CAP_SYS_ADMIN)."""


@contextlib.contextmanager
def small_disk(size_mb: int = 64) -> Iterator[Path]:
    """A fresh tmpfs of ``size_mb`` MiB, unmounted afterwards; :class:`MountError` when this
    process may not mount one."""
    mount = Path(tempfile.mkdtemp(prefix="lorp-small-disk-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        mount.rmdir()
        raise MountError(f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        with contextlib.suppress(OSError):
            mount.rmdir()


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its file system is full; the file."""
    filler = directory / "filler.bin"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    return filler
