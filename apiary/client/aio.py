"""`AsyncClient`: every call to a cluster, on asyncio. Calls go to the first queen that can
take them, move to the next only on a failure that proves the request was never served, and
keep trying while every queen is down (a restart), all within the call's deadline."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Protocol, TypeVar, Unpack

import grpc

from apiary.client.admin import AsyncAdmin
from apiary.client.queens import (
    DEFAULT_TIMEOUT,
    MAX_RESUMES,
    TOKEN_ENV,
    Backoff,
    Rotation,
    deadline_passed,
    grpc_timeout,
    queen_lost,
    queens_from,
    unreached,
)
from apiary.client.requests import InferOptions, Message, infer_request
from apiary.protoutil import continued
from apiary.security import Security, TlsFiles
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc, worker_pb2_grpc

Reply = TypeVar("Reply")
Item = TypeVar("Item", covariant=True)

# A client's channels reconnect quickly: a queen coming back is found within a second
# (grpc's default backoff grows to two minutes). While calls are open they ping the queen
# every 2 s and give it 5 s to answer: a queen whose host vanished (link cut, power lost:
# nothing says so) is given up within ~7 s and its streams resume elsewhere, not after the
# deadline or TCP's minutes. grpc also uses the 5 s as TCP_USER_TIMEOUT (data unacknowledged
# that long ends the connection), so it is not shorter: a lossy link must not cut streams.
# Idle channels do not ping (a thousand idle clients cost a queen nothing); the queen accepts
# pings at any rate (serving.SERVER_OPTIONS).
CLIENT_KEEPALIVE_MS = 2000
CLIENT_KEEPALIVE_TIMEOUT_MS = 5000
CLIENT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    # A server stream sends nothing after its request: without this, pings stop after two.
    ("grpc.http2.max_pings_without_data", 0),
)


class StreamCall(Protocol[Item]):
    """A server-streaming call as grpc.aio returns it."""

    def __aiter__(self) -> AsyncIterator[Item]: ...

    def cancel(self) -> bool: ...


class AsyncClient:
    """A client of one cluster (one queen, or several serving it), for one event loop.

    `queens`: "HOST:PORT", "A,B" or a list (default $APIARY_QUEEN, else 127.0.0.1:7070).
    `token`: a client or admin token (default $APIARY_TOKEN, read here). `tls_ca` turns TLS
    on; `tls_cert`/`tls_key` for a queen that requires client certificates. `timeout`: each
    call's deadline in seconds unless the call gives its own (math.inf: none).
    `wait_for_ready`: while no queen can be reached, keep trying until the deadline instead
    of failing at once.

    Failures are grpc's own `grpc.aio.AioRpcError` (`.code()`, `.details()`), unchanged; a
    TLS file that cannot be read is `apiary.security.SecurityError`, here.
    """

    def __init__(
        self,
        queens: str | Iterable[str] | None = None,
        *,
        token: str | None = None,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        wait_for_ready: bool = True,
    ) -> None:
        self.queens = queens_from(queens)
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self._token = os.environ.get(TOKEN_ENV, "") if token is None else token
        self._security = Security(tls=TlsFiles(cert=tls_cert, key=tls_key, ca=tls_ca))
        self._security.tls.channel_credentials()  # a missing or unreadable file fails here
        self._rotation = Rotation(self.queens)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.admin = AsyncAdmin(self)
        # Streams resumed on another queen after theirs went away mid-stream (since made).
        self.resumes = 0

    def __repr__(self) -> str:
        return f"AsyncClient({','.join(self.queens)!r}, timeout={self.timeout:g})"

    # ---- plumbing -------------------------------------------------------------------------

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel to `address` (a queen, or a leased worker), made on first use. A
        grpc.aio channel belongs to the loop that made it: on another loop, new ones are made."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._channels, self._loop = {}, loop
        channel = self._channels.get(address)
        if channel is None:
            channel = self._security.aio_channel(address, self._token, CLIENT_OPTIONS)
            self._channels[address] = channel
        return channel

    def _seconds(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    async def unary(
        self,
        call: Callable[[grpc.aio.Channel, float | None], Awaitable[Reply]],
        timeout: float | None = None,
    ) -> Reply:
        """`call(channel, grpc_timeout)` on the first queen that takes it, within the deadline."""
        loop, seconds = asyncio.get_running_loop(), self._seconds(timeout)
        deadline, backoff = loop.time() + seconds, Backoff()
        last: grpc.aio.AioRpcError | None = None
        while True:
            for address in self._rotation.order():
                if deadline - loop.time() <= 0:
                    break
                try:
                    result = await call(self.channel(address), grpc_timeout(deadline - loop.time()))
                except grpc.aio.AioRpcError as exc:
                    if not unreached(exc):
                        raise
                    last = exc
                    continue
                self._rotation.answered(address)
                return result
            await self._next_round(deadline, backoff, last or deadline_passed(seconds))

    async def stream(
        self,
        open_stream: Callable[[grpc.aio.Channel, float | None], StreamCall[Reply]],
        timeout: float | None = None,
    ) -> AsyncIterator[Reply]:
        """A server stream from the first queen that takes it. It moves to another queen only
        while nothing has arrived; after the first item, a failure is the caller's to see."""
        loop, seconds = asyncio.get_running_loop(), self._seconds(timeout)
        deadline, backoff = loop.time() + seconds, Backoff()
        last: grpc.aio.AioRpcError | None = None
        while True:
            for address in self._rotation.order():
                if deadline - loop.time() <= 0:
                    break
                call = open_stream(self.channel(address), grpc_timeout(deadline - loop.time()))
                received = False
                try:
                    async for item in call:
                        received = True
                        yield item
                    self._rotation.answered(address)
                    return
                except grpc.aio.AioRpcError as exc:
                    if received or not unreached(exc):
                        raise
                    last = exc
                finally:
                    call.cancel()  # a no-op once it ended; stops it when the caller stops early
            await self._next_round(deadline, backoff, last or deadline_passed(seconds))

    async def _next_round(
        self, deadline: float, backoff: Backoff, last: grpc.aio.AioRpcError
    ) -> None:
        """No queen could be reached: wait a little and try them all again (a queen may be
        restarting), or, past the deadline or not waiting for ready, raise the last failure."""
        seconds_left = deadline - asyncio.get_running_loop().time()
        if not self.wait_for_ready or seconds_left <= 0:
            raise last
        await asyncio.sleep(backoff.pause(seconds_left))

    async def close(self) -> None:
        """Close every channel (calls still open on them end)."""
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(channel.close(None) for channel in channels), return_exceptions=True)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # ---- inference ------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        prompt: str,
        *,
        timeout: float | None = None,
        **options: Unpack[InferOptions],
    ) -> AsyncIterator[common_pb2.InferChunk]:
        """Stream a completion of `prompt`, chunk by chunk; the last carries finish_reason and
        the token counts."""
        return self.send(infer_request(model, prompt, **options), timeout=timeout)

    def chat(
        self,
        model: str,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        **options: Unpack[InferOptions],
    ) -> AsyncIterator[common_pb2.InferChunk]:
        """Stream the assistant's reply to `messages` ({"role": ..., "content": ...}), which the
        worker renders with its model's chat template."""
        return self.send(infer_request(model, messages=messages, **options), timeout=timeout)

    def send(
        self, request: common_pb2.InferRequest, *, timeout: float | None = None
    ) -> AsyncIterator[common_pb2.InferChunk]:
        """Stream the completion of a whole InferRequest (see `infer_request`)."""
        return self._resuming(request, self._seconds(timeout))

    def _infer_stream(
        self, request: common_pb2.InferRequest, seconds: float
    ) -> AsyncIterator[common_pb2.InferChunk]:
        return self.stream(
            lambda channel, left: queen_pb2_grpc.QueenStub(channel).Infer(request, timeout=left),
            seconds,
        )

    async def _resuming(
        self, request: common_pb2.InferRequest, seconds: float
    ) -> AsyncIterator[common_pb2.InferChunk]:
        """One stream, whatever happens to the queen relaying it: if that queen goes away
        mid-stream, the rest comes from another (or the same, once back), asked to continue
        after the token ids already received, so nothing is missing or repeated. Indexes are
        renumbered to stay consecutive."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        received, index, resumes = list(request.continuation.token_ids), 0, 0
        asked, exact = request, True
        while True:
            try:
                async for chunk in self._infer_stream(asked, deadline - loop.time()):
                    received.extend(chunk.token_ids)
                    # Text without its token ids (a backend that sends none) cannot be
                    # continued exactly: such a stream is not resumed, it would repeat.
                    exact = exact and (bool(chunk.token_ids) or not chunk.text)
                    chunk.index, index = index, index + 1
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                if not (queen_lost(exc) and exact) or resumes >= MAX_RESUMES:
                    raise
                if deadline <= loop.time():
                    raise
                resumes += 1
                self.resumes += 1
                asked = continued(request, received)

    async def list_models(self, *, timeout: float | None = None) -> list[queen_pb2.ModelInfo]:
        """The models the cluster serves, with worker counts by state and queue length."""
        request = queen_pb2.ListModelsRequest()
        reply = await self.unary(
            lambda channel, left: queen_pb2_grpc.QueenStub(channel).ListModels(
                request, timeout=left
            ),
            timeout,
        )
        return list(reply.models)

    # ---- direct leases --------------------------------------------------------------------

    async def lease(
        self,
        model: str,
        *,
        required_tags: Iterable[str] = (),
        policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED,
        ttl_seconds: float = 0.0,
        timeout: float | None = None,
    ) -> queen_pb2.LeaseResponse:
        """A slot on a worker of `model`, reserved for one `infer_direct`; `release_lease` it
        if unused (else it expires after its TTL, 30 s unless given)."""
        request = queen_pb2.LeaseRequest(
            model=model, required_tags=required_tags, policy=policy, ttl_seconds=ttl_seconds
        )
        return await self.unary(
            lambda channel, left: queen_pb2_grpc.QueenStub(channel).Lease(request, timeout=left),
            timeout,
        )

    async def release_lease(
        self, lease: queen_pb2.LeaseResponse | str, *, timeout: float | None = None
    ) -> None:
        """Give back a lease that will not be used (a lease or its id)."""
        lease_id = lease if isinstance(lease, str) else lease.lease_id
        request = queen_pb2.ReleaseLeaseRequest(lease_id=lease_id)
        await self.unary(
            lambda channel, left: queen_pb2_grpc.QueenStub(channel).ReleaseLease(
                request, timeout=left
            ),
            timeout,
        )

    async def infer_direct(
        self,
        lease: queen_pb2.LeaseResponse,
        request: common_pb2.InferRequest,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[common_pb2.InferChunk]:
        """Stream `request` from the leased worker itself: the queen is out of the token
        stream. No failover: the lease names one worker."""
        direct = common_pb2.InferRequest()
        direct.CopyFrom(request)
        direct.lease_id = lease.lease_id
        stub = worker_pb2_grpc.WorkerStub(self.channel(lease.address))
        call = stub.Infer(direct, timeout=grpc_timeout(self._seconds(timeout)))
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()
