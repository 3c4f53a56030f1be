"""Server plumbing every tier shares: health, reflection, signals, ports."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio  # published as grpc_health.v1.health.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from apiary.errors import ANSWERED, StatusError
from apiary.security import Security, add_security_args

# The context every servicer method gets; request/response types are in the method signature.
Context = grpc.aio.ServicerContext[Any, Any]

# Largest message a server accepts: a request is a prompt and a few fields (prompts are
# capped well below this by validation); anything bigger is refused before it is parsed.
MAX_MESSAGE_BYTES = 1 << 20
KEEPALIVE_MS = 10_000

SERVER_OPTIONS: Sequence[tuple[str, int]] = (
    # Without this, grpc sets SO_REUSEPORT and a second process can silently share a port
    # with a stale one (e.g. a queen restarted while the old one lingers).
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Let clients ping idle connections every 10 s (see CHANNEL_OPTIONS), and ping them too.
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
)

# The longest a client channel waits between reconnect attempts (see CHANNEL_OPTIONS).
MAX_RECONNECT_BACKOFF_MS = 1000

# Long-lived client channels (hive->queen, queen->worker/hive, hive->worker).
CHANNEL_OPTIONS: Sequence[tuple[str, int]] = (
    # grpc's default reconnect backoff grows to 120 s, which would keep a hive away from a
    # queen that restarted long after it came back; cap it near the heartbeat scale.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    # A peer that vanished (host down, link cut) is noticed in ~15 s even on an idle
    # connection, not after the OS's TCP timeout of many minutes.
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass(frozen=True)
class _Undecodable:
    error: str


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Every call ends with a status a person can act on, never grpc's UNKNOWN.

    A request body that does not parse gets INVALID_ARGUMENT saying so (left to itself
    grpc.aio answers UNKNOWN "Unexpected DecodeError" and logs a traceback): the deserializer
    here never raises, and the handler refuses what it could not decode. A StatusError raised
    anywhere below a handler ends the call with its code and message.
    """

    def __init__(self) -> None:
        # The guarded handler of each handler, made once: this runs on every call.
        self._guarded: dict[int, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        known = self._guarded.get(id(handler))
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._guard(handler, details.method)
        if len(self._guarded) < 1024:  # one per method; handlers made per call are not kept
            self._guarded[id(handler)] = (handler, guarded)
        return guarded

    def _guard(self, handler: Any, method: str) -> Any:
        decode = handler.request_deserializer

        def safe_decode(body: bytes) -> Any:
            try:
                return decode(body)
            except Exception as exc:
                return _Undecodable(str(exc) or type(exc).__name__)

        message = f"the request body is not a valid message for {method}"
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _guarded_unary(handler.unary_unary, message),
                safe_decode,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _guarded_stream(handler.unary_stream, message),
                safe_decode,
                handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _guarded_bidi(handler.stream_stream, message),
                safe_decode,
                handler.response_serializer,
            )
        return handler  # client-streaming methods with one answer: none in our API


async def _begin(request: Any, context: Context, message: str) -> None:
    """Every guarded call starts here: it is marked as answered by this server (whatever its
    end, see apiary.errors.ANSWERED), and a request that did not decode is refused."""
    context.set_trailing_metadata(ANSWERED)
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{message}: {request.error}")


def _guarded_unary(inner: Callable[..., Any], message: str) -> Callable[..., Any]:
    async def unary(request: Any, context: Context) -> Any:
        await _begin(request, context, message)
        try:
            return await inner(request, context)
        except StatusError as exc:
            await context.abort(exc.code, exc.message, exc.trailers)

    return unary


def _guarded_stream(inner: Callable[..., Any], message: str) -> Callable[..., Any]:
    """A server-streaming handler of the same shape as `inner` (see _guarded_unary).

    grpc.aio allows two shapes: an async generator (ours), or a coroutine that writes with
    context.write() (grpc.health.v1's Watch); the wrapper must be the one `inner` is.
    """
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: Context) -> Any:
            await _begin(request, context, message)
            try:
                async for response in inner(request, context):
                    yield response
            except StatusError as exc:
                await context.abort(exc.code, exc.message, exc.trailers)

        return generator

    async def writer(request: Any, context: Context) -> Any:
        await _begin(request, context, message)
        try:
            return await inner(request, context)
        except StatusError as exc:
            await context.abort(exc.code, exc.message, exc.trailers)

    return writer


def _guarded_bidi(inner: Callable[..., Any], message: str) -> Callable[..., Any]:
    """A bidirectional-streaming handler (an async generator) whose requests are checked as
    they come (see _guarded_unary)."""

    async def checked(requests: Any) -> Any:
        async for request in requests:
            if isinstance(request, _Undecodable):
                raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"{message}: {request.error}")
            yield request

    async def generator(requests: Any, context: Context) -> Any:
        context.set_trailing_metadata(ANSWERED)
        try:
            async for response in inner(checked(requests), context):
                yield response
        except StatusError as exc:
            await context.abort(exc.code, exc.message, exc.trailers)

    return generator


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING first, so health checkers stop sending, then drain."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    listen: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    serving: bool = True,
    security: Security | None = None,
    methods: Mapping[str, frozenset[str]] | None = None,
) -> RunningServer:
    """Start a grpc.aio server with our services plus health and reflection.

    `listen` may use port 0; the bound port is returned. `serving=False` starts
    health as NOT_SERVING (a worker still loading its backend). `methods` says which
    roles may call what (see apiary/security.py); TLS is used when the security has a cert.
    Raises SecurityError for a configuration that must not run.
    """
    security = security or Security()
    security.check_listen(listen)
    interceptors: list[grpc.aio.ServerInterceptor] = [DecodeGuard()]  # type: ignore[type-arg]
    if security.tokens.enabled:
        # Without tokens it would let every call through: one interceptor less on each call.
        interceptors.insert(0, security.interceptor(methods or {}))
    server = grpc.aio.server(options=list(SERVER_OPTIONS), interceptors=interceptors)
    register(server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    credentials = security.tls.server_credentials()
    try:
        if credentials is not None:
            port = server.add_secure_port(listen, credentials)
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen}: {exc} (is the port in use?)") from exc
    await server.start()
    running = RunningServer(server, port, health_servicer)
    await set_serving(running, service_names, serving)
    return running


async def set_serving(running: RunningServer, service_names: Sequence[str], serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *service_names]:
        await running.health.set(name, status)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so shutdown runs in the loop, not in a handler."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def host_port(address: str, bound_port: int) -> str:
    """The address others should dial, given what we listened on and the bound port."""
    host = address.rsplit(":", 1)[0] or "127.0.0.1"
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{bound_port}"


def write_port_file(path: str, port: int) -> None:
    """Atomically publish the bound port, so whoever started us on port 0 can find it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The flags every server process takes besides its own: metrics, port file, logs, security."""
    p.add_argument(
        "--metrics-port",
        type=int,
        default=-1,
        help="serve Prometheus metrics on this port, on the listen host (0 = any; default off)",
    )
    p.add_argument("--port-file", default="", help="write the bound port here once listening")
    p.add_argument("--log-format", choices=["auto", "console", "json"], default=None)
    add_security_args(p)
