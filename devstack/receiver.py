"""A webhook receiver on loopback for the tests and the reliability runner: it records every POST
(headers, body, the status it answered) and can be down (not listening), slow (answers after
``delay_s``) or failing (answers 503 to the next ``failures`` POSTs). Standard library only."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

LOOPBACK = "127.0.0.1"
EVENT_ID_HEADER = "X-LoRP-Event-Id"  # jobcore.webhooks.EVENT_ID_HEADER (a test checks it)


@dataclass(frozen=True)
class Post:
    """One POST the receiver got."""

    headers: dict[str, str]
    body: bytes
    status: int
    at: float

    @property
    def event_id(self) -> str:
        return self.headers.get(EVENT_ID_HEADER, "")

    def json(self) -> Any:
        return json.loads(self.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, receiver: WebhookReceiver) -> None:
        self.receiver = receiver
        super().__init__((LOOPBACK, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status = self.server.receiver._answer(dict(self.headers), body)
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class WebhookReceiver:
    """``url`` stays the same across :meth:`stop` / :meth:`start` (down, then up again)."""

    def __init__(self, port: int, *, failures: int = 0, delay_s: float = 0.0) -> None:
        self.port = port
        self.failures = failures
        self.delay_s = delay_s
        self.posts: list[Post] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/hooks"

    @property
    def up(self) -> bool:
        return self._server is not None

    def start(self) -> WebhookReceiver:
        if self._server is None:
            self._server = _Server(self.port, self)
            threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def _answer(self, headers: dict[str, str], body: bytes) -> int:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            status = 503 if self.failures > 0 else 200
            self.failures -= 1
            self.posts.append(Post(headers, body, status, time.time()))
        return status

    def delivered(self) -> dict[str, list[Post]]:
        """Event id -> the POSTs of it answered 200 (more than one: a duplicate delivery)."""
        out: dict[str, list[Post]] = {}
        with self._lock:
            for post in self.posts:
                if post.status == 200:
                    out.setdefault(post.event_id, []).append(post)
        return out

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
