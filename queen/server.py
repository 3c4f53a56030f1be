"""Wiring the queen: the cluster's parts, the three services on one server, the sweep."""

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
from queen.beats import BeatLimits
from queen.channels import Channels
from queen.cluster import Cluster
from queen.events import EventBus
from queen.heartbeats import QueenRegistryService
from queen.history import History
from queen.leases import DEFAULT_MAX_TTL, LeaseManager
from queen.metrics import QueenMetrics
from queen.quotas import Quotas
from queen.registry import Registry, RegistrySettings
from queen.scheduler import Scheduler
from queen.service import QueenService

log = structlog.get_logger("queen")

SERVICE_NAMES = tuple(
    queen_pb2.DESCRIPTOR.services_by_name[name].full_name
    for name in ("Queen", "QueenRegistry", "QueenAdmin")
)
METHODS = method_table(
    **{
        "apiary.v1.Queen": frozenset({"client", "admin"}),
        "apiary.v1.QueenAdmin": frozenset({"admin"}),
        "apiary.v1.QueenRegistry": frozenset({"hive"}),
    }
)


@dataclass
class QueenConfig:
    heartbeat_interval: float = 1.0
    max_queue: int = 1024
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    # Per client (its token's name; its host without tokens), 0 = no limit: open Infer
    # streams, requests waiting for a slot, active direct leases.
    max_streams_per_client: int = 64
    max_queued_per_client: int = 256
    max_leases_per_client: int = 64
    # The longest ttl_seconds a Queen.Lease may ask for.
    max_lease_ttl: float = DEFAULT_MAX_TTL
    state_dir: Path = field(default_factory=lambda: default_state_dir("queen"))
    policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_LEAST_LOADED
    hive_ttl_intervals: float = 10.0
    breaker_failures: int = 3
    breaker_cooldown: float = 10.0
    autospawn: dict[str, SpawnPlan] = field(default_factory=dict)
    autospawn_catalog: bool = False
    hive_identity_from_cert: bool = False
    beat_limits: BeatLimits = field(default_factory=BeatLimits)

    def registry_settings(self) -> RegistrySettings:
        return RegistrySettings(
            interval=self.heartbeat_interval,
            hive_ttl_intervals=self.hive_ttl_intervals,
            default_policy=self.policy,
            breaker_failures=self.breaker_failures,
            breaker_cooldown=self.breaker_cooldown,
        )

    def quotas(self) -> Quotas:
        return Quotas.of(
            max_streams=self.max_streams_per_client,
            max_queued=self.max_queued_per_client,
            max_leases=self.max_leases_per_client,
        )


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
        await self.cluster.close()


def open_history(state_dir: Path, registry: Registry) -> History:
    """The request history, with the drains operators set before this queen started."""
    history = History(state_dir / "history.sqlite3")
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
    return history


def build_cluster(config: QueenConfig, clock: Clock, security: Security) -> Cluster:
    registry = Registry(clock, config.registry_settings())
    channels = Channels(security)
    scheduler = Scheduler(registry, config.max_queue)
    return Cluster(
        registry=registry,
        scheduler=scheduler,
        channels=channels,
        events=EventBus(),
        history=open_history(config.state_dir, registry),
        autospawn=Autospawner(registry, channels, config.autospawn, config.autospawn_catalog),
        leases=LeaseManager(scheduler, channels),
        clock=clock,
        max_tokens_cap=config.max_tokens_cap,
        max_prompt_bytes=config.max_prompt_bytes,
        max_streams_per_client=config.max_streams_per_client,
        metrics=QueenMetrics(registry, scheduler),
        hive_identity_from_cert=config.hive_identity_from_cert,
    )


async def create_server(
    listen: str, config: QueenConfig, clock: Clock | None = None, security: Security | None = None
) -> Queen:
    security = security or Security()
    cluster = build_cluster(config, clock or SystemClock(), security)

    def register(server: grpc.aio.Server) -> None:
        queen_pb2_grpc.add_QueenServicer_to_server(
            QueenService(cluster, security.tokens, config.quotas(), config.max_lease_ttl), server
        )
        queen_pb2_grpc.add_QueenRegistryServicer_to_server(
            QueenRegistryService(cluster, security, config.beat_limits), server
        )
        queen_pb2_grpc.add_QueenAdminServicer_to_server(QueenAdminService(cluster), server)

    running = await start_server(
        listen, register, SERVICE_NAMES, security=security, methods=METHODS
    )
    sweeper = asyncio.get_running_loop().create_task(cluster.sweep_forever(), name="sweep")
    return Queen(running, cluster, sweeper)
