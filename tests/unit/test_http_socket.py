"""The HTTP front's listening socket: its connections get TCP_NODELAY from asyncio (else
each keep-alive response waits ~40 ms for a delayed ACK), and a busy port is an OSError
naming the flag."""

from __future__ import annotations

import asyncio
import socket

import pytest

from queen.http.server import bind


async def test_connections_of_the_front_have_nodelay() -> None:
    sock = bind("127.0.0.1:0")
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = writer.get_extra_info("socket")
        accepted.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=sock)
    try:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await asyncio.wait_for(accepted, 5) == 1
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_a_busy_port_names_the_flag() -> None:
    first = bind("127.0.0.1:0")
    try:
        with pytest.raises(OSError, match="--http-listen"):
            bind(f"127.0.0.1:{first.getsockname()[1]}")
    finally:
        first.close()
