"""The hive's calls to its workers: health checks, status, and graceful shutdown."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apiary.channels import ChannelCache
from apiary.security import Security
from protos.v1 import common_pb2, worker_pb2, worker_pb2_grpc


class WorkerClient:
    """Calls each worker with that worker's own credential (derived from this hive's token)."""

    def __init__(self, security: Security | None = None, hive_id: str = "") -> None:
        security = security or Security()
        self.tokens = security.tokens
        self.hive_id = hive_id
        self.channels = ChannelCache(security)

    def _channel(self, worker_id: str, address: str) -> grpc.aio.Channel:
        return self.channels.get(address, self.tokens.worker_token(self.hive_id, worker_id))

    async def check(self, worker_id: str, address: str, timeout: float) -> tuple[bool, str]:
        """grpc.health.v1 Check: (True, "") when SERVING, else (False, why)."""
        stub = health_pb2_grpc.HealthStub(self._channel(worker_id, address))
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

    async def status(
        self, worker_id: str, address: str, timeout: float
    ) -> common_pb2.WorkerRecord | None:
        stub = worker_pb2_grpc.WorkerStub(self._channel(worker_id, address))
        try:
            reply = await stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return None
        return reply.worker

    async def shutdown(
        self, worker_id: str, address: str, grace: float, timeout: float = 1.0
    ) -> bool:
        stub = worker_pb2_grpc.WorkerStub(self._channel(worker_id, address))
        try:
            await stub.Shutdown(worker_pb2.ShutdownRequest(grace_seconds=grace), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return True

    def forget(self, address: str) -> None:
        """The worker behind `address` is gone: close its channel (a restart binds a new port)."""
        self.channels.discard(address)

    async def close(self) -> None:
        await self.channels.close()
