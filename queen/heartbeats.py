"""The QueenRegistry service: hives heartbeat their worker tables into the registry."""

from __future__ import annotations

import grpc
import structlog

from apiary.serving import Context
from apiary.validation import name_problem
from protos.v1 import queen_pb2, queen_pb2_grpc
from queen.channels import Channels
from queen.registry import Registry
from queen.scheduler import Scheduler

log = structlog.get_logger("queen.heartbeats")


class QueenRegistryService(queen_pb2_grpc.QueenRegistryServicer):
    def __init__(self, registry: Registry, scheduler: Scheduler, channels: Channels) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.channels = channels

    async def Heartbeat(
        self, request: queen_pb2.HiveHeartbeat, context: Context
    ) -> queen_pb2.HeartbeatReply:
        problem = name_problem("hive_id", request.hive_id)
        if not problem and not request.leaving and not request.address:
            problem = "address is required: the queen dials it to reach the hive"
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        for record in request.workers:
            problem = name_problem("worker id", record.id) or name_problem("model", record.model)
            if problem:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        outcome = self.registry.apply_heartbeat(request)
        if outcome.new_hive:
            log.info(
                "hive joined",
                hive_id=request.hive_id,
                address=request.address,
                workers=len(request.workers),
            )
        if request.leaving:
            log.info("hive left", hive_id=request.hive_id)
        for address in outcome.removed_addresses:
            self.channels.discard(address)
        self.scheduler.dispatch_all()
        return queen_pb2.HeartbeatReply(interval_seconds=self.registry.interval)
