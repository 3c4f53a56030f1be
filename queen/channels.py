"""The queen's channels to workers (relayed Infer, leases) and to hives (forwarded admin calls).

Each carries the credential for that hop only: a worker is called with its own credential
(derived from its hive's token and its id: worth nothing at any other worker), a hive with
the queen's credential toward that hive (derived from its token: worth nothing elsewhere).
The admin token an operator sent the queen never leaves the queen.
"""

from __future__ import annotations

from collections.abc import Callable

from apiary.channels import ChannelCache
from apiary.security import Security
from protos.v1 import hive_pb2_grpc, worker_pb2_grpc


class Channels:
    def __init__(self, security: Security | None = None) -> None:
        security = security or Security()
        self.tokens = security.tokens
        self.workers = ChannelCache(security)
        self.hives = ChannelCache(security)
        # (hive id, worker id) of the worker at an address; set by the cluster.
        self.worker_at: Callable[[str], tuple[str, str] | None] = lambda address: None

    def worker_token(self, address: str) -> str:
        named = self.worker_at(address)
        return self.tokens.worker_token(*named) if named is not None else ""

    def worker(self, address: str) -> worker_pb2_grpc.WorkerAsyncStub:
        return worker_pb2_grpc.WorkerStub(self.workers.get(address, self.worker_token(address)))

    def hive(self, hive_id: str, address: str) -> hive_pb2_grpc.HiveAsyncStub:
        """Hive `hive_id`, with the queen's credential toward that hive only."""
        channel = self.hives.get(address, self.tokens.queen_token(hive_id))
        return hive_pb2_grpc.HiveStub(channel)

    def discard(self, address: str) -> None:
        """A worker is gone or replaced: close its channel, letting calls on it finish."""
        self.workers.discard(address)

    def discard_all(self, addresses: list[str]) -> None:
        self.workers.discard_all(addresses)

    async def close(self) -> None:
        await self.workers.close()
        await self.hives.close()
