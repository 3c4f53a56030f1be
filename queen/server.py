"""Wiring the queen: registry, scheduler, history, events and the three services on one server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from apiary.clock import Clock, SystemClock
from apiary.paths import default_state_dir
from apiary.security import Security, method_table
from apiary.serving import RunningServer, start_server
from apiary.validation import DEFAULT_MAX_PROMPT_BYTES, DEFAULT_MAX_TOKENS_CAP
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc
from queen.admin import QueenAdminService
from queen.autospawn import Autospawner, SpawnPlan
from queen.channels import Channels
from queen.events import EventBus
from queen.heartbeats import QueenRegistryService
from queen.history import History
from queen.leases import LeaseManager
from queen.metrics import QueenMetrics
from queen.registry import Registry, RegistrySettings
from queen.router import Cluster, HiveWatch, QueenService
from queen.scheduler import Scheduler

log = structlog.get_logger("queen")

SERVICE_NAMES = tuple(
    queen_pb2.DESCRIPTOR.services_by_name[name].full_name
    for name in ("Queen", "QueenRegistry", "QueenAdmin")
)
Q = queen_pb2
# Logged as well as published: what an operator reading the queen's log wants to see.
LOGGED_EVENTS = frozenset(
    {
        Q.EVENT_KIND_HIVE_JOINED,
        Q.EVENT_KIND_HIVE_HEALTH_CHANGED,
        Q.EVENT_KIND_HIVE_REMOVED,
        Q.EVENT_KIND_WORKER_CIRCUIT_OPENED,
        Q.EVENT_KIND_WORKER_CIRCUIT_CLOSED,
        Q.EVENT_KIND_HIVE_DRAINED,
        Q.EVENT_KIND_HIVE_UNDRAINED,
    }
)


@dataclass
class QueenConfig:
    heartbeat_interval: float = 1.0
    max_queue: int = 1024
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    # Concurrent Infer streams one client token may hold (0 = no limit; needs tokens).
    max_streams_per_client: int = 64
    state_dir: Path = field(default_factory=lambda: default_state_dir("queen"))
    policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_LEAST_LOADED
    hive_ttl_intervals: float = 10.0
    breaker_failures: int = 3
    breaker_cooldown: float = 10.0
    autospawn: dict[str, SpawnPlan] = field(default_factory=dict)
    autospawn_catalog: bool = False
    hive_identity_from_cert: bool = False


@dataclass
class Queen:
    running: RunningServer
    cluster: Cluster
    sweeper: asyncio.Task[None]

    @property
    def registry(self) -> Registry:
        return self.cluster.registry

    async def stop(self, grace: float) -> None:
        self.sweeper.cancel()
        await self.running.stop(grace)
        await self.cluster.leases.close()
        await self.cluster.autospawn.close()
        await self.cluster.channels.close()
        await self.cluster.history.close()


async def sweep_forever(cluster: Cluster) -> None:
    """Health transitions, TTL removals and circuit breakers, every half interval."""
    while True:
        await asyncio.sleep(cluster.registry.interval / 2)
        try:
            for address in cluster.registry.sweep():
                cluster.channels.discard(address)
            cluster.scheduler.dispatch_all()
        except Exception:
            # The sweep must never die silently: log and keep going.
            log.exception("sweep step failed")


METHODS = method_table(
    **{
        "apiary.v1.Queen": frozenset({"client", "admin"}),
        "apiary.v1.QueenAdmin": frozenset({"admin"}),
        "apiary.v1.QueenRegistry": frozenset({"hive"}),
    }
)


async def create_server(
    listen: str, config: QueenConfig, clock: Clock | None = None, security: Security | None = None
) -> Queen:
    clock = clock or SystemClock()
    security = security or Security()
    events = EventBus()

    hive_watch = HiveWatch()

    def on_event(event: queen_pb2.Event) -> None:
        if event.kind == Q.EVENT_KIND_HIVE_REMOVED or (
            event.kind == Q.EVENT_KIND_HIVE_HEALTH_CHANGED
            and event.health == common_pb2.HIVE_HEALTH_UNHEALTHY
        ):
            hive_watch.lost(event.hive_id)
        if event.kind in LOGGED_EVENTS:
            log.info(
                Q.EventKind.Name(event.kind).removeprefix("EVENT_KIND_").lower().replace("_", " "),
                hive_id=event.hive_id,
                worker_id=event.worker_id,
                detail=event.detail,
            )
        events.publish([event])

    registry = Registry(
        clock,
        RegistrySettings(
            interval=config.heartbeat_interval,
            hive_ttl_intervals=config.hive_ttl_intervals,
            default_policy=config.policy,
            breaker_failures=config.breaker_failures,
            breaker_cooldown=config.breaker_cooldown,
        ),
        on_event=on_event,
    )
    history = History(config.state_dir / "history.sqlite3")
    history.open()
    if history.recovered:
        log.warning(
            "requests left unfinished by the previous queen marked failed", count=history.recovered
        )
    for kind, target in history.drains():
        if kind == "hive":
            registry.drain_hive(target, True)
        else:
            registry.drain_worker(target, True)
    channels = Channels(security)
    autospawner = Autospawner(registry, channels, config.autospawn, config.autospawn_catalog)

    def expecting(model: str) -> bool:
        return registry.warming_up() or autospawner.expecting(model)

    scheduler = Scheduler(registry, config.max_queue, expecting=expecting)

    def spawned(record: common_pb2.WorkerRecord) -> None:
        registry.apply_worker(record)
        scheduler.dispatch(record.model)
        events.emit(
            Q.EVENT_KIND_AUTOSPAWN,
            clock.time(),
            worker_id=record.id,
            hive_id=record.hive_id,
            model=record.model,
        )

    autospawner.on_spawned = spawned
    autospawner.on_failure = scheduler.fail
    cluster = Cluster(
        registry=registry,
        scheduler=scheduler,
        channels=channels,
        events=events,
        history=history,
        autospawn=autospawner,
        leases=LeaseManager(scheduler, channels),
        clock=clock,
        max_tokens_cap=config.max_tokens_cap,
        max_prompt_bytes=config.max_prompt_bytes,
        max_streams_per_client=config.max_streams_per_client,
        metrics=QueenMetrics(registry, scheduler),
        hive_watch=hive_watch,
        hive_identity_from_cert=config.hive_identity_from_cert,
    )

    def register(server: grpc.aio.Server) -> None:
        queen_pb2_grpc.add_QueenServicer_to_server(QueenService(cluster), server)
        queen_pb2_grpc.add_QueenRegistryServicer_to_server(QueenRegistryService(cluster), server)
        queen_pb2_grpc.add_QueenAdminServicer_to_server(QueenAdminService(cluster), server)

    running = await start_server(
        listen, register, SERVICE_NAMES, security=security, methods=METHODS
    )
    sweeper = asyncio.get_running_loop().create_task(sweep_forever(cluster), name="sweep")
    return Queen(running, cluster, sweeper)
