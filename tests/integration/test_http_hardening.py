"""HTTP hardening of ``python -m service.serve`` (issue 18, items 1, 2 and 5), against a real API
process spoken to over raw sockets: request heads over ``LORP_MAX_HEADER_BYTES`` get 431 without
being buffered, slow heads and bodies get 408 and the connection closed, idle connections are
closed, and the access log never records the value of a credential passed in the query string.

Redis and S3 are not running: the API starts anyway (it logs warnings) and these checks need
neither."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import ApiServer, free_port

pytestmark = pytest.mark.integration

API_KEY = "key-alpha-0123456789"
MAX_HEADER_BYTES = 16 * 1024
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 10.0  # every socket operation below is bounded by this


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    env = {
        "LORP_API_KEYS": json.dumps({API_KEY: "alpha"}),
        "LORP_S3_BUCKET": "lorp-test",
        "LORP_S3_ACCESS_KEY_ID": "x",
        "LORP_S3_SECRET_ACCESS_KEY": "y",
        "LORP_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "LORP_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "LORP_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "LORP_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT_S),
        "LORP_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_S),
    }
    log_path: Path = tmp_path_factory.mktemp("api") / "api.log"
    server = ApiServer(env, log_path=log_path, start_timeout=60.0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _connect(api: ApiServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=SOCKET_TIMEOUT_S)
    sock.settimeout(SOCKET_TIMEOUT_S)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, lower-cased headers, body by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:length]


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection (EOF or reset), within the socket timeout."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _get_healthz(api: ApiServer) -> int:
    with _connect(api) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
        return _read_response(sock)[0]


def _send_big_head(api: ApiServer, size: int) -> tuple[int, dict[str, str], bytes, float]:
    head = b"GET /healthz HTTP/1.1\r\nHost: api\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    with _connect(api) as sock:
        start = time.monotonic()
        # the server may answer and stop reading before it has it all: read what it said
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
        status, headers, body = _read_response(sock)
        return status, headers, body, time.monotonic() - start


def test_header_just_under_the_limit_is_served(api: ApiServer) -> None:
    status, _, _, _ = _send_big_head(api, MAX_HEADER_BYTES - 1024)
    assert status == 200


def test_oversized_header_gets_431_quickly_and_the_api_still_answers(api: ApiServer) -> None:
    status, headers, body, elapsed = _send_big_head(api, 1024 * 1024)
    assert status == 431, body
    assert json.loads(body) == {
        "detail": f"request headers larger than {MAX_HEADER_BYTES} bytes",
        "code": "headers_too_large",
    }
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert elapsed < 2.0
    assert _get_healthz(api) == 200


def test_header_over_the_limit_in_one_chunk_gets_431(api: ApiServer) -> None:
    """A head slightly over the limit that arrives complete in one read is refused too."""
    status, _, body, _ = _send_big_head(api, MAX_HEADER_BYTES + 512)
    assert status == 431
    assert json.loads(body)["code"] == "headers_too_large"


def test_slow_body_gets_408_and_the_connection_closed(api: ApiServer) -> None:
    head = (
        "POST /jobs HTTP/1.1\r\nHost: api\r\n"
        f"X-API-Key: {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    with _connect(api) as sock:
        start = time.monotonic()
        sock.sendall(head.encode() + b'{"model": ')  # 10 of the 100 bytes, then nothing
        status, headers, body = _read_response(sock)
        elapsed = time.monotonic() - start
        assert status == 408, body
        assert json.loads(body) == {
            "detail": f"request body not received within {BODY_TIMEOUT_S:g} s",
            "code": "request_timeout",
        }
        assert headers["connection"] == "close"
        assert BODY_TIMEOUT_S - 0.5 < elapsed < BODY_TIMEOUT_S + 2.0
        assert _closed_by_server(sock)
    assert _get_healthz(api) == 200


def test_unread_body_does_not_hold_the_connection(api: ApiServer) -> None:
    """A body the API never reads (here, on a GET) can't keep the connection open either."""
    with _connect(api) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: api\r\nContent-Length: 100\r\n\r\n0123456789")
        status, _, _ = _read_response(sock)
        assert status == 200
        assert _closed_by_server(sock)
        assert time.monotonic() - start < BODY_TIMEOUT_S + 3.0


def test_slow_head_gets_408_and_the_connection_closed(api: ApiServer) -> None:
    with _connect(api) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: api\r\nX-Slow: a")  # the head never ends
        status, _, body = _read_response(sock)
        elapsed = time.monotonic() - start
        assert status == 408, body
        assert json.loads(body)["code"] == "request_timeout"
        assert elapsed < HEADER_TIMEOUT_S + 2.0
        assert _closed_by_server(sock)


def test_idle_connection_is_closed(api: ApiServer) -> None:
    with _connect(api) as sock:
        start = time.monotonic()
        assert _closed_by_server(sock)  # nothing sent: closed without an answer
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 2.0


def test_access_log_redacts_credentials_in_the_query_string(api: ApiServer) -> None:
    with _connect(api) as sock:
        sock.sendall(
            b"GET /jobs?limit=5&api_key=secret-value-123&token=tok-456789 HTTP/1.1\r\n"
            b"Host: api\r\n\r\n"
        )
        assert _read_response(sock)[0] == 401
    deadline = time.monotonic() + 5.0
    while "GET /jobs?" not in api.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = api.log_text()
    assert "GET /jobs?limit=5&api_key=***&token=*** HTTP/1.1" in log
    assert "secret-value-123" not in log
    assert "tok-456789" not in log


# -- the log filter itself (no process) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        ("/jobs", "/jobs"),
        ("/jobs?", "/jobs?"),
        ("/jobs?state=queued&limit=5&cursor=abc", "/jobs?state=queued&limit=5&cursor=abc"),
        ("/jobs?api_key=k-123&limit=5", "/jobs?api_key=***&limit=5"),
        (
            "/x?X-Amz-Signature=ab&X-Amz-Credential=cd&x=1",
            "/x?X-Amz-Signature=***&X-Amz-Credential=***&x=***",
        ),
        ("/jobs?key-alpha-0123456789", "/jobs?***"),
        ("/jobs?LIMIT=5&Token=t&&password=", "/jobs?LIMIT=5&Token=***&&password=***"),
    ],
)
def test_redact_query(target: str, logged: str) -> None:
    from service.serve import redact_query

    assert redact_query(target) == logged


def test_access_log_filter_redacts_the_path_argument() -> None:
    import logging

    from service.serve import RedactQueryFilter

    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/jobs?api_key=secret-value-123", "1.1", 401), None,
    )  # fmt: skip
    assert RedactQueryFilter().filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /jobs?api_key=*** HTTP/1.1" 401'
