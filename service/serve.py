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

The HTTP limits (``LORP_MAX_HEADER_BYTES``, ``LORP_HEADER_TIMEOUT_SECONDS``,
``LORP_BODY_TIMEOUT_SECONDS``) are enforced by :class:`LimitedHttpToolsProtocol`, uvicorn's
httptools protocol with byte counting and two timers, because httptools parses a request head in
the protocol layer before any ASGI middleware sees it (and buffers every header value whole):

* a request head (request line + headers) over ``LORP_MAX_HEADER_BYTES`` is answered 431
  ``headers_too_large`` as soon as that many bytes have arrived, never buffered in full;
* a head not complete ``LORP_HEADER_TIMEOUT_SECONDS`` after the connection opened (or after its
  first byte, on a kept-alive connection) is answered 408 ``request_timeout``; a connection that
  sends nothing in that time is closed;
* a body the app reads (POST/PUT/PATCH) and that is not complete ``LORP_BODY_TIMEOUT_SECONDS``
  after its head is answered 408 ``request_timeout`` by the app (``service.main``); any other
  unfinished body (one the app never reads) closes the connection a second later.

Every such answer says ``connection: close``; the rest of the client's input is read and dropped
for up to :data:`LINGER_S` (so the client reads the answer instead of a reset), then the
connection is closed. ``--http h11`` runs uvicorn's pure-Python h11 parser instead: heads over
``LORP_MAX_HEADER_BYTES`` get h11's 400, there is no head timeout, the body timeout holds.

The access log never shows the value of a query parameter other than ``state``, ``limit`` and
``cursor`` (an API key passed as ``?api_key=...`` is logged as ``?api_key=***``): see
:class:`RedactQueryFilter`, installed on ``uvicorn.access`` in every API process.

A worker that dies is started again on its socket (connections queued there wait for it);
SIGTERM or SIGINT stops all workers gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any
from urllib.parse import unquote_plus

import httptools
import uvicorn
from uvicorn.config import LOGGING_CONFIG, STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from jobcore.config import Settings

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
STOP_TIMEOUT_S = 30.0
PROTOCOL = "service.serve:LimitedHttpToolsProtocol"
LINGER_S = 2.0  # after a 431/408, the client's input is read and dropped this long, then closed
BODY_BACKSTOP_S = 1.0  # an unfinished body the app does not answer closes this much later
SAFE_QUERY_PARAMETERS = frozenset({"state", "limit", "cursor"})  # logged with their values
REDACTED = "***"

log = logging.getLogger("uvicorn.error")


# --------------------------------------------------------------------------------------------
# access log: no credentials from query strings


def redact_query(target: str) -> str:
    """``target`` (a path with a query string) with the value of every parameter not in
    :data:`SAFE_QUERY_PARAMETERS` replaced by ``***`` (a parameter without ``=`` entirely):
    ``/jobs?limit=5&api_key=k`` -> ``/jobs?limit=5&api_key=***``."""
    path, sep, query = target.partition("?")
    if not sep or not query:
        return target
    out = []
    for item in query.split("&"):
        name, eq, _ = item.partition("=")
        if not item or unquote_plus(name).strip().lower() in SAFE_QUERY_PARAMETERS:
            out.append(item)
        else:
            out.append(f"{name}={REDACTED}" if eq else REDACTED)
    return f"{path}?{'&'.join(out)}"


class RedactQueryFilter(logging.Filter):
    """Redacts query strings (:func:`redact_query`) in a record's arguments, e.g. the path of
    uvicorn's access log line ``'%s - "%s %s HTTP/%s" %d'``; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and "?" in a for a in args):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in args)
        return True


def install_log_redaction(logger: str = "uvicorn.access") -> None:
    """Add a :class:`RedactQueryFilter` to ``logger`` unless it has one (for apps run by a plain
    ``uvicorn``; :func:`log_config` does it for ``service.serve``)."""
    target = logging.getLogger(logger)
    if not any(isinstance(f, RedactQueryFilter) for f in target.filters):
        target.addFilter(RedactQueryFilter())


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with :class:`RedactQueryFilter` on its access log."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_query"] = {"()": "service.serve.RedactQueryFilter"}
    config["loggers"]["uvicorn.access"]["filters"] = ["redact_query"]
    return config


# --------------------------------------------------------------------------------------------
# HTTP limits


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    header_timeout: float
    body_timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            settings.max_header_bytes,
            settings.header_timeout_seconds,
            settings.body_timeout_seconds,
        )


@functools.cache
def http_limits() -> HttpLimits:
    """This process's limits, read once from the ``LORP_*`` environment."""
    return HttpLimits.from_settings(Settings())  # type: ignore[call-arg]  # from LORP_* env


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a head over the limit."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`HttpLimits` (module docstring).

    Bytes are counted as they arrive while a head is incomplete, so a head over the limit is
    refused after at most one read past it (httptools would otherwise collect a header value
    of any size, re-copying it on every read). A head that does fit is measured exactly once
    parsed (request target + header names and values), so the limit does not depend on how
    the bytes were split into reads. Timers are armed only for heads and bodies that do not
    arrive in the read that starts them: a request that arrives whole costs nothing extra."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = http_limits()
        self.max_header_bytes = limits.max_header_bytes
        self.header_timeout = limits.header_timeout
        self.body_timeout = limits.body_timeout
        self._awaiting_head = True  # the next bytes belong to a request head
        self._head_started = False  # ... and some of them have been parsed
        self._head_bytes = 0  # raw bytes received while awaiting this head
        self._head_size = 0  # the head as parsed: target + names and values
        self._in_body = False  # head done, body not yet complete
        self._rejected = False  # answered 431/408: input is dropped until closed
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    # connection
    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        # a connection that never completes its first head is closed (uvicorn's keep-alive
        # timeout starts only after a response)
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._body_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return  # answered; the rest of the input is dropped
        self._unset_keepalive_if_required()
        if self._awaiting_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._reject_head()
            else:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        if self._awaiting_head:
            if self._head_bytes > self.max_header_bytes:
                self._reject_head()
            elif (self._head_started or self._head_bytes) and self._head_timer is None:
                self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        elif self._in_body and self._body_timer is None:
            self._body_timer = self.loop.call_later(
                self.body_timeout + BODY_BACKSTOP_S, self._body_timed_out
            )

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._head_size > self.max_header_bytes:
            raise _HeadTooLarge
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._awaiting_head = True
        self._head_started = False
        self._head_bytes = 0
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # limits
    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._rejected or not self._awaiting_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined head waits behind a response still being made: look again later
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        elif self._head_started or self._head_bytes:
            detail = f"request headers not received within {self.header_timeout:g} s"
            self._reject(408, detail, "request_timeout")
        else:
            self.transport.close()  # connected and sent nothing

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self._rejected or not self._in_body or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle.response_complete:
            self.transport.close()  # answered; the rest of the body would only be dropped
        elif cycle.response_started:
            cycle.keep_alive = False  # closed once the response is sent
        else:
            detail = f"request body not received within {self.body_timeout:g} s"
            self._reject(408, detail, "request_timeout")

    def _reject_head(self) -> None:
        detail = f"request headers larger than {self.max_header_bytes} bytes"
        self._reject(431, detail, "headers_too_large")

    def _reject(self, status: int, detail: str, code: str) -> None:
        """Answer ``status`` with the service's JSON error, then drop input until closed."""
        self._rejected = True
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() returns a disconnect
            cycle.message_event.set()
        body = json.dumps({"detail": detail, "code": code}).encode()
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        client = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
        self.logger.warning("%s%s: %d", client, detail, status)
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then EOF
            self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


# --------------------------------------------------------------------------------------------
# processes


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
    parser.add_argument(
        "--http",
        choices=("httptools", "h11"),
        default="httptools",
        help="HTTP parser: httptools with all of the service's HTTP limits (default), or h11",
    )
    args = parser.parse_args(argv)

    settings = Settings()  # type: ignore[call-arg]  # from LORP_* env
    workers = settings.api_workers
    config = uvicorn.Config(
        args.app,
        host=args.host,
        port=args.port,
        http=PROTOCOL if args.http == "httptools" else "h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        loop="uvloop",
        proxy_headers=args.proxy_headers,
        log_level=args.log_level,
        log_config=log_config(),
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
