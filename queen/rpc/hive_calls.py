"""QueenAdmin calls that act on one hive (catalog, processes, backends), forwarded by the queen.

Operators reach a whole cluster through one address with one credential; the queen calls the
hive with its own (queen) credential, so the admin token never leaves the queen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from apiary.protoutil import naming
from apiary.serving import Context
from protos.v1 import common_pb2, hive_pb2, hive_pb2_grpc, queen_pb2
from queen.cluster import Cluster
from queen.members import HiveEntry

Reply = TypeVar("Reply")
Handler = Callable[[Any, Any, Context], Awaitable[Any]]


def forwarded(method: str, translate: Callable[[Any], Message]) -> Handler:
    """A QueenAdmin handler that forwards its request, translated, to the named hive's `method`."""

    async def handler(calls: HiveCalls, request: Any, context: Context) -> Any:
        return await calls.forward(request.hive_id, context, method, translate(request))

    handler.__name__ = handler.__qualname__ = f"forwarded_{method}"
    return handler


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

    async def forward(self, hive_id: str, context: Context, method: str, request: Message) -> Any:
        """One unary call forwarded to the hive: its answer, or its refusal as ours."""
        hive, stub = await self.on_hive(hive_id, context)
        call = getattr(stub, method)(request, timeout=context.time_remaining())
        return await self.relay(hive, call, context)

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

    # The calls that only forward one request: (the hive's method, the request it takes).
    ListCatalog = forwarded("ListModels", lambda request: hive_pb2.ListCatalogRequest())
    GetCatalogModel = forwarded(
        "GetModel", lambda request: hive_pb2.GetCatalogModelRequest(name=request.name)
    )
    DeleteCatalogModel = forwarded(
        "DeleteModel", lambda request: hive_pb2.DeleteCatalogModelRequest(name=request.name)
    )
    ListProcesses = forwarded("ListProcesses", lambda request: hive_pb2.ListProcessesRequest())
    GetProcess = forwarded(
        "GetProcess", lambda request: hive_pb2.GetProcessRequest(pid=request.pid)
    )
    KillProcess = forwarded(
        "KillProcess", lambda request: hive_pb2.KillProcessRequest(pid=request.pid)
    )
    ListBackends = forwarded("ListBackends", lambda request: hive_pb2.ListBackendsRequest())
    GetBackend = forwarded(
        "GetBackend", lambda request: hive_pb2.GetBackendRequest(name=request.name)
    )
