"""Runs the HTTP front with uvicorn inside the queen's process, on its event loop.

The queen binds the socket itself (so `--http-listen H:0` works and a busy port is an
OSError the queen reports, not uvicorn's sys.exit), keeps its own signal handling (uvicorn's
would take SIGTERM from the drain), and stops the front after its streams have drained.
With the queen's TLS certificate the front speaks HTTPS, and with --tls-client-ca it asks
for client certificates as gRPC does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Generator
from dataclasses import dataclass

import structlog
import uvicorn
from starlette.types import ASGIApp

from apiary.security import Security

log = structlog.get_logger("queen.http.openai")

# Once the queen has drained: how long open HTTP connections get to finish.
CLOSE_GRACE = 2
# Polls (5 ms apart) for uvicorn to have started on the socket given to it.
STARTUP_TURNS = 1000


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the queen's own decide when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class HttpFront:
    server: EmbeddedServer
    task: asyncio.Task[None]
    port: int
    scheme: str

    async def stop(self) -> None:
        """Close the listener and idle connections; cut what is left after CLOSE_GRACE."""
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), CLOSE_GRACE + 1)
        except TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def bind(listen: str) -> socket.socket:
    """The listening socket, made as a TCP socket by name (IPPROTO_TCP): asyncio sets
    TCP_NODELAY only on connections of such sockets, and without it every keep-alive
    response waits ~40 ms for the client's delayed ACK."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(1024)
    except (OSError, ValueError) as exc:
        sock.close()
        raise OSError(f"cannot listen on {listen} (--http-listen): {exc}") from None
    sock.setblocking(False)
    return sock


async def serve_http(listen: str, security: Security, app: ASGIApp) -> HttpFront:
    """Start the front on `listen` serving `app`; raises OSError if it cannot listen there."""
    security.check_listen(listen, "--http-listen")
    tls = security.tls
    config = uvicorn.Config(
        app, lifespan="off", log_config=None, access_log=False,
        server_header=False, timeout_graceful_shutdown=CLOSE_GRACE,
        # The peer is the client: an X-Forwarded-For header, which anyone can send, is not
        # believed (it let one client pass for many, past its per-client caps).
        proxy_headers=False,
        ssl_certfile=tls.cert or None, ssl_keyfile=tls.key or None,
        ssl_ca_certs=tls.client_ca or None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE,
    )  # fmt: skip
    sock = bind(listen)
    server = EmbeddedServer(config)
    task = asyncio.get_running_loop().create_task(server.serve([sock]), name="http-front")
    for _ in range(STARTUP_TURNS):  # startup is a few loop turns: it binds nothing itself
        if server.started or task.done():
            break
        await asyncio.sleep(0.005)
    if not server.started:
        server.should_exit = True
        sock.close()
        if task.done() and task.exception() is not None:
            raise OSError(f"the HTTP front on {listen} failed to start: {task.exception()}")
        raise OSError(f"the HTTP front on {listen} did not start")
    port = int(sock.getsockname()[1])
    scheme = "https" if tls.cert else "http"
    log.info("OpenAI API listening", url=f"{scheme}://{listen.rpartition(':')[0]}:{port}/v1")
    return HttpFront(server, task, port, scheme)
