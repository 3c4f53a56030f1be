"""The QueenAdmin service: what operators see of the cluster and how they change it."""

from __future__ import annotations

import grpc
import structlog

from apiary.protoutil import naming, timestamp
from apiary.serving import Context
from protos.v1 import common_pb2, hive_pb2, queen_pb2, queen_pb2_grpc
from queen.channels import Channels
from queen.registry import HiveEntry, Registry
from queen.scheduler import Scheduler

log = structlog.get_logger("queen.admin")


class QueenAdminService(queen_pb2_grpc.QueenAdminServicer):
    def __init__(self, registry: Registry, scheduler: Scheduler, channels: Channels) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.channels = channels

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
            slots_total=sum(w.record.slots_total for w in workers),
            slots_in_use=sum(w.in_flight for w in workers),
            stats=hive.stats,
        )

    async def _hive(self, hive_id: str, context: Context) -> HiveEntry:
        hive = self.registry.hives.get(hive_id)
        if hive is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown hive {hive_id!r}; hives: {naming(self.registry.hives)}",
            )
        return hive

    async def ListHives(
        self, request: queen_pb2.ListHivesRequest, context: Context
    ) -> queen_pb2.ListHivesResponse:
        hives = sorted(self.registry.hives.values(), key=lambda h: h.id)
        return queen_pb2.ListHivesResponse(hives=[self.hive_info(h) for h in hives])

    async def GetHive(
        self, request: queen_pb2.GetHiveRequest, context: Context
    ) -> queen_pb2.GetHiveResponse:
        hive = await self._hive(request.hive_id, context)
        workers = sorted(
            (w.view() for w in self.registry.workers_of_hive(hive.id)), key=lambda r: r.id
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
        records = []
        for entry in self.registry.workers.values():
            record = entry.view()
            if request.hive_id and record.hive_id != request.hive_id:
                continue
            if request.model and record.model != request.model:
                continue
            if request.state and record.state != request.state:
                continue
            records.append(record)
        records.sort(key=lambda r: (r.hive_id, r.model, r.id))
        return queen_pb2.ListWorkersResponse(workers=records)

    async def GetWorker(
        self, request: queen_pb2.GetWorkerRequest, context: Context
    ) -> queen_pb2.GetWorkerResponse:
        entry = self.registry.workers.get(request.worker_id)
        if entry is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown worker {request.worker_id!r}; workers: {naming(self.registry.workers)}",
            )
        return queen_pb2.GetWorkerResponse(worker=entry.view())

    async def _routable_hive(self, hive_id: str, context: Context) -> HiveEntry:
        """The named hive (or the only one), refusing an unhealthy one."""
        if not hive_id:
            if len(self.registry.hives) != 1:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"hive_id is required when the cluster has {len(self.registry.hives)} hives; "
                    f"hives: {naming(self.registry.hives)}",
                )
            hive_id = next(iter(self.registry.hives))
        hive = await self._hive(hive_id, context)
        health, reason = self.registry.hive_health(hive)
        if health != queen_pb2.HIVE_HEALTH_HEALTHY:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"hive {hive.id} is unhealthy: {reason}"
            )
        return hive

    async def SpawnWorker(
        self, request: queen_pb2.QueenSpawnWorkerRequest, context: Context
    ) -> queen_pb2.QueenSpawnWorkerResponse:
        hive = await self._routable_hive(request.hive_id, context)
        forward = hive_pb2.SpawnWorkerRequest(
            model=request.model,
            backend=request.backend,
            slots=request.slots,
            device=request.device,
            backend_options=request.backend_options,
            wait_ready=request.wait_ready,
            restart_policy=request.restart_policy,
        )
        try:
            reply = await self.channels.hive(hive.address).SpawnWorker(
                forward, timeout=context.time_remaining()
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"hive {hive.id}: {exc.details()}")
        # The hive's reply is as fresh as a heartbeat: route to the worker from now on.
        self.registry.apply_worker(reply.worker)
        self.scheduler.dispatch(reply.worker.model)
        log.info("worker spawned via queen", hive_id=hive.id, worker_id=reply.worker.id)
        return queen_pb2.QueenSpawnWorkerResponse(worker=reply.worker)

    async def RetireWorker(
        self, request: queen_pb2.RetireWorkerRequest, context: Context
    ) -> queen_pb2.RetireWorkerResponse:
        entry = self.registry.workers.get(request.worker_id)
        if entry is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown worker {request.worker_id!r}; workers: {naming(self.registry.workers)}",
            )
        hive = await self._routable_hive(entry.record.hive_id, context)
        try:
            reply = await self.channels.hive(hive.address).StopWorker(
                hive_pb2.StopWorkerRequest(worker_id=request.worker_id, force=request.force),
                timeout=context.time_remaining(),
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"hive {hive.id}: {exc.details()}")
        log.info(
            "worker retired", hive_id=hive.id, worker_id=request.worker_id, force=request.force
        )
        return queen_pb2.RetireWorkerResponse(worker=reply.worker)
