"""The queen's channels to workers (relayed Infer, leases) and to hives (forwarded admin calls)."""

from __future__ import annotations

from apiary.channels import ChannelCache
from apiary.security import Security
from protos.v1 import hive_pb2_grpc, worker_pb2_grpc


class Channels:
    """Workers are called with the worker token, hives (forwarded admin calls) with admin's."""

    def __init__(self, security: Security | None = None) -> None:
        security = security or Security()
        self.workers = ChannelCache(security, security.tokens.worker)
        self.hives = ChannelCache(security, security.tokens.admin)

    def worker(self, address: str) -> worker_pb2_grpc.WorkerAsyncStub:
        return worker_pb2_grpc.WorkerStub(self.workers.get(address))

    def hive(self, address: str) -> hive_pb2_grpc.HiveAsyncStub:
        return hive_pb2_grpc.HiveStub(self.hives.get(address))

    def discard(self, address: str) -> None:
        """A worker is gone or replaced: close its channel, letting calls on it finish."""
        self.workers.discard(address)

    def discard_all(self, addresses: list[str]) -> None:
        self.workers.discard_all(addresses)

    async def close(self) -> None:
        await self.workers.close()
        await self.hives.close()
