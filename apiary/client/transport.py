"""`Transport`: how every client call reaches a cluster. It owns the channels (to the queens,
and to leased workers) and the one failover loop: queens in rotation, a call moved to the next
only on a failure that proves it was never served, every queen tried again while none can be
reached (a restart), all within the call's deadline. AsyncClient and AsyncAdmin each hold one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import grpc

from apiary.client.queens import (
    DEFAULT_TIMEOUT,
    Backoff,
    Rotation,
    deadline_passed,
    grpc_timeout,
    unreached,
)
from apiary.security import Security, TlsFiles

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


# What the caller of a Transport method gives: a call made on a channel, with the grpc
# `timeout=` left of the deadline (None: no deadline).
UnaryOpener = Callable[[grpc.aio.Channel, float | None], Awaitable[Reply]]
StreamOpener = Callable[[grpc.aio.Channel, float | None], StreamCall[Reply]]


class Single(Generic[Reply]):
    """A unary call seen as a stream of its one reply, so that unary calls and streams go
    through the same failover loop."""

    def __init__(self, reply: Awaitable[Reply]) -> None:
        self._reply = reply

    async def __aiter__(self) -> AsyncIterator[Reply]:
        yield await self._reply

    def cancel(self) -> bool:
        return False  # an awaited grpc call cancels itself when its awaiting task is cancelled


class Transport:
    """The channels to one cluster, for one event loop at a time, and the failover rules.

    `queens` in the order to try them; `token` sent on every call; `tls` turns TLS on (a
    missing or unreadable file fails here). `timeout`: a call's deadline in seconds unless
    it gives its own (math.inf: none). `wait_for_ready`: while no queen can be reached, keep
    trying until the deadline instead of failing at once.
    """

    def __init__(
        self,
        queens: tuple[str, ...],
        *,
        token: str = "",
        tls: TlsFiles | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        wait_for_ready: bool = True,
    ) -> None:
        self.queens = queens
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self._token = token
        self._security = Security(tls=tls or TlsFiles())
        self._security.tls.channel_credentials()  # a missing or unreadable file fails here
        self._rotation = Rotation(queens)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

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

    def seconds(self, timeout: float | None) -> float:
        """A call's deadline in seconds: its own, else the transport's."""
        return self.timeout if timeout is None else timeout

    async def unary(self, call: UnaryOpener[Reply], timeout: float | None = None) -> Reply:
        """`call(channel, grpc_timeout)` on the first queen that takes it, within the deadline."""
        (reply,) = [
            reply
            async for reply in self.stream(
                lambda channel, left: Single(call(channel, left)), timeout
            )
        ]
        return reply

    async def stream(
        self, open_stream: StreamOpener[Reply], timeout: float | None = None
    ) -> AsyncIterator[Reply]:
        """A server stream from the first queen that takes it. It moves to another queen only
        while nothing has arrived; after the first item, a failure is the caller's to see."""
        loop, seconds = asyncio.get_running_loop(), self.seconds(timeout)
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

    async def direct(
        self, address: str, open_stream: StreamOpener[Reply], timeout: float | None = None
    ) -> AsyncIterator[Reply]:
        """A server stream from `address` alone (a leased worker): no failover."""
        call = open_stream(self.channel(address), grpc_timeout(self.seconds(timeout)))
        try:
            async for item in call:
                yield item
        finally:
            call.cancel()

    async def everywhere(
        self, call: UnaryOpener[Reply], timeout: float | None = None
    ) -> list[Reply | BaseException]:
        """`call` on every queen at once, for what each queen keeps apart (its request
        history): each one's reply or failure, in the order of `queens`."""
        left = grpc_timeout(self.seconds(timeout))
        return await asyncio.gather(
            *(call(self.channel(queen), left) for queen in self.queens), return_exceptions=True
        )

    async def close(self) -> None:
        """Close every channel (calls still open on them end)."""
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(channel.close(None) for channel in channels), return_exceptions=True)
