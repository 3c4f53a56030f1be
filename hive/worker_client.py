"""The hive's calls to its workers: health checks, status, and graceful shutdown."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apiary.security import Security
from apiary.serving import CHANNEL_OPTIONS
from protos.v1 import common_pb2, worker_pb2, worker_pb2_grpc


class WorkerClient:
    def __init__(self, security: Security | None = None) -> None:
        self.security = security or Security()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self.security.aio_channel(
                address, self.security.tokens.worker, CHANNEL_OPTIONS
            )
            self._channels[address] = channel
        return channel

    async def check(self, address: str, timeout: float) -> tuple[bool, str]:
        """grpc.health.v1 Check: (True, "") when SERVING, else (False, why)."""
        stub = health_pb2_grpc.HealthStub(self._channel(address))
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return (
                False,
                f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
            )
        return True, ""

    async def status(self, address: str, timeout: float) -> common_pb2.WorkerRecord | None:
        stub = worker_pb2_grpc.WorkerStub(self._channel(address))
        try:
            reply = await stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return None
        return reply.worker

    async def shutdown(self, address: str, grace: float, timeout: float = 1.0) -> bool:
        stub = worker_pb2_grpc.WorkerStub(self._channel(address))
        try:
            await stub.Shutdown(worker_pb2.ShutdownRequest(grace_seconds=grace), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return True

    def forget(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close(None))

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)
