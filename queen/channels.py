"""Long-lived client channels from the queen to workers and hives, one per address."""

from __future__ import annotations

import asyncio

import grpc

from apiary.security import Security
from apiary.serving import CHANNEL_OPTIONS
from protos.v1 import hive_pb2_grpc, worker_pb2_grpc

# Active calls on a channel being closed get this long to finish.
CLOSE_GRACE_SECONDS = 30.0


class Channels:
    """Workers are called with the worker token, hives (forwarded admin calls) with admin's."""

    def __init__(self, security: Security | None = None) -> None:
        self.security = security or Security()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def channel(self, address: str, token: str = "") -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self.security.aio_channel(address, token, CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    def worker(self, address: str) -> worker_pb2_grpc.WorkerAsyncStub:
        return worker_pb2_grpc.WorkerStub(self.channel(address, self.security.tokens.worker))

    def hive(self, address: str) -> hive_pb2_grpc.HiveAsyncStub:
        return hive_pb2_grpc.HiveStub(self.channel(address, self.security.tokens.admin))

    def discard(self, address: str) -> None:
        """Close the channel in the background, letting calls still on it finish."""
        channel = self._channels.pop(address, None) if address else None
        if channel is None:
            return
        task = asyncio.get_running_loop().create_task(channel.close(CLOSE_GRACE_SECONDS))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        await asyncio.gather(
            *(c.close(None) for c in channels), *self._closing, return_exceptions=True
        )
