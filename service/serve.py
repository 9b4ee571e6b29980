"""Run the API: ``python -m service.serve [--host H] [--port P] [--proxy-headers]``.

Starts ``LORP_API_WORKERS`` uvicorn processes of ``service.main:app`` (a sync route holds its
process's GIL, so one process uses at most one core). The settings are read here first, so a bad
configuration stops the start once instead of in every worker. Plain ``uvicorn --workers N`` is
not used, for three reasons measured on this service:

* It binds the shared socket with ``proto=0``; accepted connections inherit it and asyncio then
  never sets ``TCP_NODELAY`` on them (uvicorn issue #3149), so on Linux every keep-alive response
  whose headers and body leave in two writes waits ~40 ms for the client's delayed ACK.
  :func:`listen_socket` binds with ``IPPROTO_TCP`` and sets ``TCP_NODELAY``.
* All workers accept from one socket, and asyncio accepts every pending connection at once: a
  burst of new keep-alive clients lands on whichever worker wakes first (717 of 747 requests on
  one of two workers). Here each worker has its own ``SO_REUSEPORT`` socket and the kernel spreads
  new connections over them.
* Prometheus metrics are per process: with more than one worker ``PROMETHEUS_MULTIPROC_DIR`` is
  set to a fresh private directory (removed at exit) so ``/metrics`` sums all workers, whichever
  of them answers the scrape (see ``service.main``).

Each worker parses HTTP with httptools on a uvloop event loop (uvicorn's ``http="httptools"``,
``loop="uvloop"``; both are dependencies of the ``service`` extra): about 0.1 ms less CPU per
request here than h11 on asyncio, which is what the API's latency under load is made of.

A worker that dies is started again on its socket (connections queued there wait for it);
SIGTERM or SIGINT stops all workers gracefully.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from service.config import Settings

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
STOP_TIMEOUT_S = 30.0

log = logging.getLogger("uvicorn.error")


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound (not yet listening) TCP socket whose accepted connections get ``TCP_NODELAY``;
    with ``reuse_port`` several such sockets can share the port (one per worker)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _run_worker(config: uvicorn.Config, sock: socket.socket) -> None:
    """Entry point of one worker process (exit code 3 when it never started serving)."""
    config.configure_logging()
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


class Supervisor:
    """Runs one worker process per socket, restarts one that dies after it started serving,
    stops all on SIGTERM/SIGINT or when a worker can't start (exit code 3, like uvicorn)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        self.config = config
        self.sockets = sockets
        self.context = multiprocessing.get_context("spawn")
        self.processes: list[BaseProcess] = []
        self.stopping = False
        self.exit_code = 0

    def _start(self, index: int) -> BaseProcess:
        process = self.context.Process(
            target=_run_worker, args=(self.config, self.sockets[index]), name=f"api-{index}"
        )
        process.start()
        return process

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        """Supervise until stopped; the exit code for the launcher."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop)
        self.processes = [self._start(i) for i in range(len(self.sockets))]
        log.info("started %d API workers", len(self.processes))
        while not self.stopping:
            wait([p.sentinel for p in self.processes], timeout=0.5)
            for i, process in enumerate(self.processes):
                if self.stopping or process.exitcode is None:
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    log.error("API worker %s could not start; stopping", i)
                    self.stopping = True
                    self.exit_code = STARTUP_FAILURE
                else:
                    log.warning("API worker %s exited (%s); starting it again", i, process.exitcode)
                    self.processes[i] = self._start(i)
        for process in self.processes:
            if process.exitcode is None and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in self.processes:
            process.join(STOP_TIMEOUT_S)
            if process.exitcode is None:
                process.kill()
                process.join()
        return self.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", nargs="?", default="service.main:app", help="ASGI app import path")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--proxy-headers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use X-Forwarded-* from $FORWARDED_ALLOW_IPS (uvicorn's default: 127.0.0.1)",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    workers = Settings().api_workers  # type: ignore[call-arg]  # from LORP_* env
    config = uvicorn.Config(
        args.app,
        host=args.host,
        port=args.port,
        http="httptools",
        loop="uvloop",
        proxy_headers=args.proxy_headers,
        log_level=args.log_level,
    )
    if workers == 1:
        server = uvicorn.Server(config)
        server.run(sockets=[listen_socket(args.host, args.port)])
        return 0 if server.started else STARTUP_FAILURE
    sockets = [listen_socket(args.host, args.port, reuse_port=True) for _ in range(workers)]
    metrics_dir = tempfile.mkdtemp(prefix="lorp-api-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir  # inherited by the worker processes
    try:
        return Supervisor(config, sockets).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
