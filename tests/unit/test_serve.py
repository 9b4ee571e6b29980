"""The API launcher's listening sockets (service.serve); the worker processes it supervises are
exercised on the real stack in tests/integration/test_reliability.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
import uvloop

from service.serve import listen_socket


async def _nodelay_of_accepted(sock: socket.socket) -> int:
    """TCP_NODELAY of the connection asyncio accepts on ``sock`` (as uvicorn serves it)."""
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = writer.get_extra_info("socket")
        accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=sock)
    async with server:
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        result = await asyncio.wait_for(accepted, timeout=10)
        writer.close()
    return result


@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_accepted_connections_get_tcp_nodelay(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """uvicorn's own listener (``proto=0``) loses it: issue #3149, ~40 ms per keep-alive reply.
    The API serves on uvloop (service.serve); asyncio is kept as the case of the issue."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(_nodelay_of_accepted(listen_socket("127.0.0.1", 0))) != 0


def test_reuse_port_sockets_listen_on_one_port() -> None:
    first = listen_socket("127.0.0.1", 0, reuse_port=True)
    first.listen()
    port = first.getsockname()[1]
    second = listen_socket("127.0.0.1", port, reuse_port=True)
    second.listen()
    assert second.getsockname()[1] == port
    with pytest.raises(OSError):
        listen_socket("127.0.0.1", port)  # without SO_REUSEPORT the port is taken
    for sock in (first, second):
        sock.close()
