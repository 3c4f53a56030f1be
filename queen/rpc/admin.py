"""The QueenAdmin service: what operators see of the cluster and how they change it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import TypeVar

import grpc
import structlog

from apiary.protoutil import READY_STATES, naming, timestamp
from apiary.serving import Context
from protos.v1 import common_pb2, hive_pb2, queen_pb2, queen_pb2_grpc
from queen.cluster import Cluster
from queen.members import HiveEntry, WorkerEntry
from queen.requests.admission import tags_problem
from queen.rpc.hive_calls import HiveCalls

log = structlog.get_logger("queen.rpc.admin")


class QueenAdminService(HiveCalls, queen_pb2_grpc.QueenAdminServicer):
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.registry = cluster.registry
        self.desk = cluster.desk
        self.channels = cluster.channels

    def _view(self, entry: WorkerEntry) -> common_pb2.WorkerRecord:
        """A worker as operators see it, scored by the router."""
        return self.registry.view(entry, self.cluster.router.score(entry))

    def hive_info(self, hive: HiveEntry) -> queen_pb2.HiveInfo:
        health, reason = self.registry.hive_health(hive)
        workers = list(self.registry.workers_of_hive(hive.id))
        return queen_pb2.HiveInfo(
            id=hive.id,
            address=hive.address,
            health=health,
            health_reason=reason,
            heartbeat_age_seconds=self.registry.heartbeat_age(hive),
            first_seen=timestamp(hive.first_seen_wall),
            resources=hive.resources,
            worker_count=len(workers),
            # Capacity is what can serve: a FAILED, LOADING or STOPPING worker's slots are not.
            slots_total=sum(
                w.record.slots_total for w in workers if w.record.state in READY_STATES
            ),
            slots_in_use=sum(w.in_flight for w in workers),
            stats=hive.stats,
            drained=hive.drained,
            backends=sorted(hive.backends),
            problems=hive.problems,
        )

    async def _hive(self, hive_id: str, context: Context) -> HiveEntry:
        return await _known(self.registry.hives, "hive", hive_id, context)

    async def _worker(self, worker_id: str, context: Context) -> WorkerEntry:
        return await _known(self.registry.workers, "worker", worker_id, context)

    async def ListHives(
        self, request: queen_pb2.ListHivesRequest, context: Context
    ) -> queen_pb2.ListHivesResponse:
        hives = sorted(self.registry.hives.values(), key=lambda h: h.id)
        return queen_pb2.ListHivesResponse(
            hives=[self.hive_info(h) for h in hives], queen=self.cluster.status()
        )

    async def GetHive(
        self, request: queen_pb2.GetHiveRequest, context: Context
    ) -> queen_pb2.GetHiveResponse:
        hive = await self._hive(request.hive_id, context)
        workers = sorted(
            (self._view(w) for w in self.registry.workers_of_hive(hive.id)),
            key=lambda r: r.id,
        )
        return queen_pb2.GetHiveResponse(hive=self.hive_info(hive), workers=workers)

    async def ListWorkers(
        self, request: queen_pb2.ListWorkersRequest, context: Context
    ) -> queen_pb2.ListWorkersResponse:
        if request.hive_id:
            await self._hive(request.hive_id, context)
        if request.state and request.state not in common_pb2.WorkerState.values():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown worker state {request.state}"
            )
        if request.hive_health and request.hive_health not in common_pb2.HiveHealth.values():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown hive health {request.hive_health}"
            )
        problem = tags_problem(list(request.tags))
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        tags = set(request.tags)
        records = []
        for entry in self.registry.workers.values():
            if request.model and entry.record.model != request.model:
                continue
            if request.hive_id and entry.record.hive_id != request.hive_id:
                continue
            if not tags.issubset(entry.record.tags):
                continue
            record = self._view(entry)
            if request.state and record.state != request.state:
                continue
            if request.hive_health and record.hive_health != request.hive_health:
                continue
            if record.slots_available < request.min_free_slots:
                continue
            records.append(record)
        records.sort(key=lambda r: (r.hive_id, r.model, r.id))
        return queen_pb2.ListWorkersResponse(workers=records)

    async def GetWorker(
        self, request: queen_pb2.GetWorkerRequest, context: Context
    ) -> queen_pb2.GetWorkerResponse:
        entry = await self._worker(request.worker_id, context)
        return queen_pb2.GetWorkerResponse(worker=self._view(entry))

    async def SpawnWorker(
        self, request: queen_pb2.QueenSpawnWorkerRequest, context: Context
    ) -> queen_pb2.QueenSpawnWorkerResponse:
        hive = await self.routable_hive(request.hive_id, context)
        forward = hive_pb2.SpawnWorkerRequest(
            model=request.model,
            backend=request.backend,
            slots=request.slots,
            device=request.device,
            backend_options=request.backend_options,
            wait_ready=request.wait_ready,
            restart_policy=request.restart_policy,
            tags=request.tags,
        )
        try:
            reply = await self.channels.hive(hive.id, hive.address).SpawnWorker(
                forward, timeout=context.time_remaining()
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"hive {hive.id}: {exc.details()}")
        # The hive's reply is as fresh as a heartbeat: route to the worker from now on.
        self.cluster.apply_worker(reply.worker)
        log.info("worker spawned via queen", hive_id=hive.id, worker_id=reply.worker.id)
        return queen_pb2.QueenSpawnWorkerResponse(worker=reply.worker)

    async def RetireWorker(
        self, request: queen_pb2.RetireWorkerRequest, context: Context
    ) -> queen_pb2.RetireWorkerResponse:
        entry = await self._worker(request.worker_id, context)
        hive = await self.routable_hive(entry.record.hive_id, context)
        try:
            reply = await self.channels.hive(hive.id, hive.address).StopWorker(
                hive_pb2.StopWorkerRequest(worker_id=request.worker_id, force=request.force),
                timeout=context.time_remaining(),
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"hive {hive.id}: {exc.details()}")
        log.info(
            "worker retired", hive_id=hive.id, worker_id=request.worker_id, force=request.force
        )
        return queen_pb2.RetireWorkerResponse(worker=reply.worker)

    async def DrainHive(
        self, request: queen_pb2.DrainHiveRequest, context: Context
    ) -> queen_pb2.DrainHiveResponse:
        hive = await self._hive(request.hive_id, context)
        drained = not request.undrain
        await self._kept_by_hive(hive, "", drained, context)
        self.registry.drain_hive(hive.id, drained)
        if not drained:
            self.desk.dispatch_all()
        log.info("hive drain", hive_id=hive.id, drained=drained)
        return queen_pb2.DrainHiveResponse(hive=self.hive_info(hive))

    async def DrainWorker(
        self, request: queen_pb2.DrainWorkerRequest, context: Context
    ) -> queen_pb2.DrainWorkerResponse:
        entry = await self._worker(request.worker_id, context)
        drained = not request.undrain
        hive = self.registry.hives.get(entry.record.hive_id)
        if hive is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"worker {entry.id}'s hive is not known right now"
            )
        await self._kept_by_hive(hive, entry.id, drained, context)
        self.registry.drain_worker(entry.id, drained)
        if not drained:
            self.desk.dispatch(entry.record.model)
        log.info("worker drain", worker_id=entry.id, drained=drained)
        return queen_pb2.DrainWorkerResponse(worker=self._view(entry))

    async def _kept_by_hive(
        self, hive: HiveEntry, worker_id: str, drained: bool, context: Context
    ) -> None:
        """The hive keeps the drain (every queen hears it in its heartbeats): no hive, no drain."""
        stub = self.cluster.channels.hive(hive.id, hive.address)
        await self.relay(
            hive, stub.SetDrain(hive_pb2.SetDrainRequest(worker_id=worker_id, drained=drained),
                                timeout=10), context,
        )  # fmt: skip

    async def WatchEvents(
        self, request: queen_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[queen_pb2.Event]:
        unknown = [k for k in request.kinds if k not in queen_pb2.EventKind.values()]
        if unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown event kinds {unknown}")
        subscriber = self.cluster.events.subscribe(request.kinds)
        try:
            async for event in subscriber:
                yield event
        finally:
            self.cluster.events.unsubscribe(subscriber)

    async def ListRequests(
        self, request: queen_pb2.ListRequestsRequest, context: Context
    ) -> queen_pb2.ListRequestsResponse:
        if request.status and request.status not in queen_pb2.RequestStatus.values():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown status {request.status}"
            )
        records = await asyncio.to_thread(
            self.cluster.history.query, request.status, request.model, request.limit
        )
        return queen_pb2.ListRequestsResponse(requests=records)


Row = TypeVar("Row")


async def _known(rows: Mapping[str, Row], kind: str, key: str, context: Context) -> Row:
    """The row named `key`, or NOT_FOUND naming the ones there are."""
    row = rows.get(key)
    if row is None:
        await context.abort(
            grpc.StatusCode.NOT_FOUND, f"unknown {kind} {key!r}; {kind}s: {naming(rows)}"
        )
        raise AssertionError("not reached: abort raises")
    return row
