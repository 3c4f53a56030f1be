"""QueenAdmin calls that act on one hive (catalog, processes, backends), forwarded by the queen.

Operators reach a whole cluster through one address with one credential; the queen calls the
hive with its own (queen) credential, so the admin token never leaves the queen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from apiary.protoutil import naming
from apiary.serving import Context
from protos.v1 import common_pb2, hive_pb2, hive_pb2_grpc, queen_pb2
from queen.cluster import Cluster
from queen.members import HiveEntry

Reply = TypeVar("Reply")


class HiveCalls:
    """The forwarding half of the QueenAdmin service (a mixin: see queen/rpc/admin.py)."""

    cluster: Cluster

    async def routable_hive(self, hive_id: str, context: Context) -> HiveEntry:
        """The named hive (or the only one), refusing an unhealthy one."""
        hives = self.cluster.registry.hives
        if not hive_id:
            if len(hives) != 1:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"hive_id is required when the cluster has {len(hives)} hives; "
                    f"hives: {naming(hives)}",
                )
            hive_id = next(iter(hives))
        hive = hives.get(hive_id)
        if hive is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown hive {hive_id!r}; hives: {naming(hives)}"
            )
        health, reason = self.cluster.registry.hive_health(hive)
        if health == common_pb2.HIVE_HEALTH_UNHEALTHY:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"hive {hive.id} is unhealthy: {reason}"
            )
        return hive

    async def on_hive(
        self, hive_id: str, context: Context
    ) -> tuple[HiveEntry, hive_pb2_grpc.HiveAsyncStub]:
        hive = await self.routable_hive(hive_id, context)
        return hive, self.cluster.channels.hive(hive.id, hive.address)

    @staticmethod
    async def relay(hive: HiveEntry, call: Awaitable[Reply], context: Context) -> Reply:
        """The hive's answer, or its refusal as ours (saying which hive refused)."""
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"hive {hive.id}: {exc.details()}")
            raise  # not reached: abort raises

    async def forward(
        self,
        hive_id: str,
        context: Context,
        method: Callable[[hive_pb2_grpc.HiveAsyncStub], Callable[..., Awaitable[Reply]]],
        request: Message,
    ) -> Reply:
        """One unary call forwarded to the hive: its answer, or its refusal as ours."""
        hive, stub = await self.on_hive(hive_id, context)
        return await self.relay(
            hive, method(stub)(request, timeout=context.time_remaining()), context
        )

    async def ListCatalog(
        self, request: queen_pb2.HiveRequest, context: Context
    ) -> hive_pb2.ListCatalogResponse:
        forward = hive_pb2.ListCatalogRequest()
        return await self.forward(request.hive_id, context, lambda hive: hive.ListModels, forward)

    async def GetCatalogModel(
        self, request: queen_pb2.HiveModelRequest, context: Context
    ) -> hive_pb2.GetCatalogModelResponse:
        forward = hive_pb2.GetCatalogModelRequest(name=request.name)
        return await self.forward(request.hive_id, context, lambda hive: hive.GetModel, forward)

    async def DeleteCatalogModel(
        self, request: queen_pb2.HiveModelRequest, context: Context
    ) -> hive_pb2.DeleteCatalogModelResponse:
        forward = hive_pb2.DeleteCatalogModelRequest(name=request.name)
        return await self.forward(request.hive_id, context, lambda hive: hive.DeleteModel, forward)

    async def PullModel(
        self, request: queen_pb2.HivePullRequest, context: Context
    ) -> AsyncIterator[hive_pb2.PullProgress]:
        hive, stub = await self.on_hive(request.hive_id, context)
        stream = stub.PullModel(request.pull, timeout=context.time_remaining())
        try:
            async for progress in stream:
                yield progress
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"hive {hive.id}: {exc.details()}")
        finally:
            stream.cancel()

    async def ListProcesses(
        self, request: queen_pb2.HiveRequest, context: Context
    ) -> hive_pb2.ListProcessesResponse:
        forward = hive_pb2.ListProcessesRequest()
        return await self.forward(
            request.hive_id, context, lambda hive: hive.ListProcesses, forward
        )

    async def GetProcess(
        self, request: queen_pb2.HiveProcessRequest, context: Context
    ) -> hive_pb2.GetProcessResponse:
        forward = hive_pb2.GetProcessRequest(pid=request.pid)
        return await self.forward(request.hive_id, context, lambda hive: hive.GetProcess, forward)

    async def KillProcess(
        self, request: queen_pb2.HiveProcessRequest, context: Context
    ) -> hive_pb2.KillProcessResponse:
        forward = hive_pb2.KillProcessRequest(pid=request.pid)
        return await self.forward(request.hive_id, context, lambda hive: hive.KillProcess, forward)

    async def ListBackends(
        self, request: queen_pb2.HiveRequest, context: Context
    ) -> hive_pb2.ListBackendsResponse:
        forward = hive_pb2.ListBackendsRequest()
        return await self.forward(request.hive_id, context, lambda hive: hive.ListBackends, forward)

    async def GetBackend(
        self, request: queen_pb2.HiveBackendRequest, context: Context
    ) -> hive_pb2.GetBackendResponse:
        forward = hive_pb2.GetBackendRequest(name=request.name)
        return await self.forward(request.hive_id, context, lambda hive: hive.GetBackend, forward)
