"""Long-lived client channels, one per address, closed when the peer behind it goes away."""

from __future__ import annotations

import asyncio

import grpc

from apiary.security import Security
from apiary.serving import CHANNEL_OPTIONS

# Active calls on a channel being closed get this long to finish.
CLOSE_GRACE_SECONDS = 30.0


class ChannelCache:
    """Channels to many peers of one kind (workers, hives), each carrying `token`.

    `discard(address)` when a peer is gone or replaced (a restarted worker binds a new
    port): its channel closes in the background, letting calls still on it finish.
    """

    def __init__(self, security: Security | None = None, token: str = "") -> None:
        self.security = security or Security()
        self.token = token
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, address: str, token: str | None = None) -> grpc.aio.Channel:
        """The channel to `address`, made on first use with `token` (default: the cache's)."""
        channel = self._channels.get(address)
        if channel is None:
            token = self.token if token is None else token
            channel = self.security.aio_channel(address, token, CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    def discard(self, address: str) -> None:
        channel = self._channels.pop(address, None) if address else None
        if channel is None:
            return
        task = asyncio.get_running_loop().create_task(channel.close(CLOSE_GRACE_SECONDS))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def discard_all(self, addresses: list[str]) -> None:
        for address in addresses:
            self.discard(address)

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        await asyncio.gather(
            *(c.close(None) for c in channels), *self._closing, return_exceptions=True
        )
