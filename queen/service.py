"""The Queen service: admits requests, routes each Infer (queen/route.py), hands out direct
leases, and lists the models served."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from apiary.errors import StatusError
from apiary.protoutil import READY_STATES, timestamp
from apiary.security import bearer
from apiary.serving import Context
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc
from queen.admission import admit
from queen.cluster import Cluster
from queen.leases import DEFAULT_TTL, MAX_TTL
from queen.registry import Registry
from queen.route import Route
from queen.scheduler import ModelGone, QueueFull


class StreamCounts:
    """Open Infer streams per client token, so one client cannot take every slot."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self.open: dict[str, int] = {}

    def full(self, client: str) -> bool:
        return bool(self.limit) and self.open.get(client, 0) >= self.limit

    def opened(self, client: str) -> None:
        self.open[client] = self.open.get(client, 0) + 1

    def closed(self, client: str) -> None:
        self.open[client] -= 1
        if not self.open[client]:
            del self.open[client]


class QueenService(queen_pb2_grpc.QueenServicer):
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        # Only clients with tokens are counted.
        self.streams = StreamCounts(cluster.max_streams_per_client)

    # ---- Infer ------------------------------------------------------------

    async def Infer(
        self, request: common_pb2.InferRequest, context: Context
    ) -> AsyncIterator[common_pb2.InferChunk]:
        request_id = request.request_id or uuid.uuid4().hex
        with structlog.contextvars.bound_contextvars(request_id=request_id, model=request.model):
            refused = admit(self.cluster, request)
            if refused is not None:
                await context.abort(refused.code, refused.message)
            if request.lease_id:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "lease_id is for calling a worker directly, not the queen",
                )
            client = bearer(context.invocation_metadata())
            if client and self.streams.full(client):
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this client already has {self.streams.limit} streams open (the limit per "
                    "token); wait for one to finish",
                )
            if client:
                self.streams.opened(client)
            try:
                async for chunk in self._infer(request, request_id, context):
                    yield chunk
            finally:
                if client:
                    self.streams.closed(client)

    async def _infer(
        self, request: common_pb2.InferRequest, request_id: str, context: Context
    ) -> AsyncIterator[common_pb2.InferChunk]:
        cluster = self.cluster
        forward = common_pb2.InferRequest()
        forward.CopyFrom(request)
        forward.request_id = request_id
        route = Route(cluster, forward, context)
        cluster.history.accepted(request_id, request.model, cluster.clock.time())
        cluster.events.emit(
            queen_pb2.EVENT_KIND_REQUEST_QUEUED,
            cluster.clock.time(),
            request_id=request_id,
            model=request.model,
        )
        try:
            async for chunk in route.run():
                yield chunk
        except StatusError as failed:
            await route.finish(ok=False, error=f"{failed.code.name}: {failed.message}")
            await context.abort(failed.code, failed.message)
        except asyncio.CancelledError:
            await asyncio.shield(route.finish(ok=False, error="CANCELLED: the client went away"))
            raise
        await route.finish(ok=True, error="")

    # ---- Lease ------------------------------------------------------------

    async def Lease(
        self, request: queen_pb2.LeaseRequest, context: Context
    ) -> queen_pb2.LeaseResponse:
        refused = admit(self.cluster, request)
        if refused is not None:
            await context.abort(refused.code, refused.message)
        if not 0 <= request.ttl_seconds <= MAX_TTL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"ttl_seconds must be within 0..{MAX_TTL:g}"
            )
        ttl = request.ttl_seconds or DEFAULT_TTL
        try:
            slot = await self.cluster.scheduler.take_slot(
                request.model,
                context.time_remaining(),
                frozenset(),
                request.policy,
                frozenset(request.required_tags),
            )
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no free worker of model {request.model!r} before the deadline",
            )
        except (QueueFull, ModelGone) as exc:
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if isinstance(exc, QueueFull)
                else grpc.StatusCode.UNAVAILABLE
            )
            await context.abort(code, str(exc))
        try:
            lease = await self.cluster.leases.hold(slot, ttl)
        except StatusError as exc:
            await context.abort(exc.code, str(exc))
        return queen_pb2.LeaseResponse(
            lease_id=lease.id,
            worker_id=slot.worker_id,
            address=slot.address,
            expires_at=timestamp(self.cluster.clock.time() + ttl),
            ttl_seconds=ttl,
        )

    async def ReleaseLease(
        self, request: queen_pb2.ReleaseLeaseRequest, context: Context
    ) -> queen_pb2.ReleaseLeaseResponse:
        if not self.cluster.leases.release(request.lease_id):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no active lease {request.lease_id!r} (it ended, expired or never existed)",
            )
        return queen_pb2.ReleaseLeaseResponse()

    # ---- ListModels -------------------------------------------------------

    async def ListModels(
        self, request: queen_pb2.ListModelsRequest, context: Context
    ) -> queen_pb2.ListModelsResponse:
        registry = self.cluster.registry
        models = [
            model_info(registry, name, self.cluster.scheduler.queue_depth(name))
            for name in sorted(set(registry.models()) | registry.catalog_models())
        ]
        return queen_pb2.ListModelsResponse(models=models)


def model_info(registry: Registry, name: str, queued: int) -> queen_pb2.ModelInfo:
    """Workers of the model by state, ready ones as the queen's slot count sees them."""
    info = queen_pb2.ModelInfo(
        name=name, queued=queued, hives=sorted(h.id for h in registry.catalog_hives(name))
    )
    for entry in registry.workers_of_model(name):
        state = entry.record.state
        if state in READY_STATES:
            state = (
                common_pb2.WORKER_STATE_BUSY if entry.in_flight else common_pb2.WORKER_STATE_IDLE
            )
        if state == common_pb2.WORKER_STATE_IDLE:
            info.idle += 1
        elif state == common_pb2.WORKER_STATE_BUSY:
            info.busy += 1
        elif state == common_pb2.WORKER_STATE_LOADING:
            info.loading += 1
        elif state == common_pb2.WORKER_STATE_FAILED:
            info.failed += 1
    return info
