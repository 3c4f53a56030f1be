"""Wiring the queen: registry, scheduler and the three services on one grpc.aio server."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from apiary.clock import Clock, SystemClock
from apiary.serving import RunningServer, start_server
from apiary.validation import DEFAULT_MAX_TOKENS_CAP
from protos.v1 import queen_pb2, queen_pb2_grpc
from queen.admin import QueenAdminService
from queen.channels import Channels
from queen.heartbeats import QueenRegistryService
from queen.registry import Registry
from queen.router import QueenService
from queen.scheduler import Scheduler

SERVICE_NAMES = tuple(
    queen_pb2.DESCRIPTOR.services_by_name[name].full_name
    for name in ("Queen", "QueenRegistry", "QueenAdmin")
)


@dataclass
class QueenConfig:
    heartbeat_interval: float = 1.0
    max_queue: int = 1024
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP


@dataclass
class Queen:
    running: RunningServer
    registry: Registry
    scheduler: Scheduler
    channels: Channels

    async def stop(self, grace: float) -> None:
        await self.running.stop(grace)
        await self.channels.close()


async def create_server(listen: str, config: QueenConfig, clock: Clock | None = None) -> Queen:
    registry = Registry(clock or SystemClock(), config.heartbeat_interval)
    scheduler = Scheduler(registry, config.max_queue)
    channels = Channels()

    def register(server: grpc.aio.Server) -> None:
        queen_pb2_grpc.add_QueenServicer_to_server(
            QueenService(registry, scheduler, channels, config.max_tokens_cap), server
        )
        queen_pb2_grpc.add_QueenRegistryServicer_to_server(
            QueenRegistryService(registry, scheduler, channels), server
        )
        queen_pb2_grpc.add_QueenAdminServicer_to_server(
            QueenAdminService(registry, scheduler, channels), server
        )

    running = await start_server(listen, register, SERVICE_NAMES)
    return Queen(running, registry, scheduler, channels)
