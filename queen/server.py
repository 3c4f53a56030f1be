"""Wiring the queen: the cluster's parts, the three services on one server, the sweep, and
the way out (`Queen.stop`: a drain, then the stop)."""

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
from apiary.validation import (
    DEFAULT_MAX_PROMPT_BYTES,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MAX_TOKENS_CAP,
)
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc
from queen.autospawn import Autospawner, SpawnPlan
from queen.beats import BeatLimits
from queen.channels import Channels
from queen.cluster import Cluster
from queen.events import EventBus
from queen.history import History
from queen.http.app import web_app
from queen.http.dashboard.routes import Dashboard
from queen.http.openai.app import DEFAULT_WRITE_TIMEOUT
from queen.http.server import HttpFront, serve_http
from queen.leases.manager import DEFAULT_MAX_TTL, LeaseManager
from queen.metrics import QueenMetrics
from queen.quotas import Quotas
from queen.registry import Registry, RegistrySettings
from queen.requests.progress import DEFAULT_MIGRATION_LIMIT
from queen.routing.desk import DEFAULT_CACHE_WAIT, DEFAULT_MAX_WAIT, Desk
from queen.routing.prefix_index import ENTRY_BYTES
from queen.routing.router import Router, RoutingSettings
from queen.rpc.admin import QueenAdminService
from queen.rpc.heartbeats import QueenRegistryService
from queen.rpc.queen import QueenService

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


DEFAULT_SHUTDOWN_GRACE = 30.0
# Once the grace is over: how long the streams cut then get to end with their status, and
# then how long the server gives every call left (event watches, a client not reading).
CUT_WAIT = 2.0
FINAL_GRACE = 1.0


@dataclass
class QueenConfig:
    heartbeat_interval: float = 1.0
    max_queue: int = 1024
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    # Per client (its token's name; its host without tokens), 0 = no limit: open Infer
    # streams, requests waiting for a slot, active direct leases.
    max_streams_per_client: int = 64
    max_queued_per_client: int = 256
    max_leases_per_client: int = 64
    # The longest ttl_seconds a Queen.Lease may ask for.
    max_lease_ttl: float = DEFAULT_MAX_TTL
    state_dir: Path = field(default_factory=lambda: default_state_dir("queen"))
    # UNSPECIFIED: by model (cache-aware on llamacpp workers, least-loaded otherwise).
    policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED
    # Cache-aware: the longest wait for a busy holder of the prefix; the index's memory.
    cache_wait: float = DEFAULT_CACHE_WAIT
    cache_index_mb: int = 64
    hive_ttl_intervals: float = 10.0
    breaker_failures: int = 3
    breaker_cooldown: float = 10.0
    autospawn: dict[str, SpawnPlan] = field(default_factory=dict)
    autospawn_catalog: bool = False
    hive_identity_from_cert: bool = False
    beat_limits: BeatLimits = field(default_factory=BeatLimits)
    # How long a stopping queen lets streams in flight finish before it ends them.
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    # The longest a request (or lease) waits for a free slot, whatever its deadline.
    max_wait: float = DEFAULT_MAX_WAIT
    # Where the OpenAI-compatible HTTP front listens ("" = no front).
    http_listen: str = ""
    # An HTTP client that takes nothing of its stream for this long is cut (0 = never).
    client_write_timeout: float = DEFAULT_WRITE_TIMEOUT
    # How many times a request may move mid-stream to another worker (queen/requests/progress.py).
    migration_limit: int = DEFAULT_MIGRATION_LIMIT

    def registry_settings(self) -> RegistrySettings:
        return RegistrySettings(
            interval=self.heartbeat_interval,
            hive_ttl_intervals=self.hive_ttl_intervals,
        )

    def routing_settings(self) -> RoutingSettings:
        return RoutingSettings(
            default_policy=self.policy,
            cache_index_entries=self.cache_index_mb * 1_000_000 // ENTRY_BYTES,
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
    service: QueenService
    # The HTTP front (the OpenAI-compatible API and the dashboard), when --http-listen asks.
    http: HttpFront | None = None
    dashboard: Dashboard | None = None
    _stopping: asyncio.Task[None] | None = None
    # Set by a second SIGTERM/SIGINT: the grace ends now.
    hurried: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def registry(self) -> Registry:
        return self.cluster.registry

    async def stop(self, grace: float) -> None:
        """Drain, then stop (see _stop). Idempotent: a second call waits for the first."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(grace))
        await asyncio.shield(self._stopping)

    def hurry(self) -> None:
        """End the grace now: streams still in flight are cut at once."""
        self.hurried.set()

    async def _stop(self, grace: float) -> None:
        """Health says NOT_SERVING and Infer and Lease are refused at once, and requests
        waiting for a slot end (UNAVAILABLE, saying so); heartbeats and admin calls go on, so
        the hives keep the streams' workers known. Streams in flight get `grace` seconds to
        finish; the rest are cut (UNAVAILABLE, saying so, and recorded so). Then the server
        stops and the cluster's parts close (the history writes everything queued)."""
        await self.running.health.enter_graceful_shutdown()
        self.service.stop()
        in_flight = self.service.in_flight
        log.info("queen draining: no new requests", streams=len(in_flight), grace=grace)
        if not await in_flight.finished(grace, self.hurried):
            log.warning(
                "shutdown grace over: ending the streams left", streams=in_flight.cut(grace)
            )
            await in_flight.finished(CUT_WAIT)
        self.sweeper.cancel()
        if self.dashboard is not None:
            self.dashboard.live.stop()  # open pages' streams end, so the front can close
        if self.http is not None:
            await self.http.stop()
        await self.running.stop(FINAL_GRACE)
        await self.cluster.close()


def open_history(state_dir: Path) -> History:
    """The request history. (Drains are the hives' to keep: they come with heartbeats.)"""
    history = History(state_dir / "history.sqlite3")
    history.open()
    return history


def build_cluster(config: QueenConfig, clock: Clock, security: Security) -> Cluster:
    registry = Registry(clock, config.registry_settings())
    router = Router(registry, config.routing_settings())
    channels = Channels(security)
    desk = Desk(router, config.max_queue, config.cache_wait)
    history = open_history(config.state_dir)
    return Cluster(
        registry=registry,
        router=router,
        desk=desk,
        channels=channels,
        events=EventBus(),
        history=history,
        autospawn=Autospawner(registry, channels, config.autospawn, config.autospawn_catalog),
        leases=LeaseManager(desk, channels, clock),
        clock=clock,
        max_tokens_cap=config.max_tokens_cap,
        default_max_tokens=config.default_max_tokens,
        max_prompt_bytes=config.max_prompt_bytes,
        max_streams_per_client=config.max_streams_per_client,
        migration_limit=config.migration_limit,
        metrics=QueenMetrics(registry, desk, history),
        hive_identity_from_cert=config.hive_identity_from_cert,
    )


async def create_server(
    listen: str, config: QueenConfig, clock: Clock | None = None, security: Security | None = None
) -> Queen:
    security = security or Security()
    cluster = build_cluster(config, clock or SystemClock(), security)
    service = QueenService(
        cluster, security.tokens, config.quotas(), config.max_lease_ttl, config.max_wait
    )

    admin = QueenAdminService(cluster)

    def register(server: grpc.aio.Server) -> None:
        queen_pb2_grpc.add_QueenServicer_to_server(service, server)
        queen_pb2_grpc.add_QueenRegistryServicer_to_server(
            QueenRegistryService(cluster, security, config.beat_limits), server
        )
        queen_pb2_grpc.add_QueenAdminServicer_to_server(admin, server)

    running = await start_server(
        listen, register, SERVICE_NAMES, security=security, methods=METHODS
    )
    http, dashboard = None, None
    if config.http_listen:
        # The dashboard decides who may call each admin RPC as this gRPC server does.
        verdict = security.interceptor(METHODS).verdict
        dashboard = Dashboard(service, admin, verdict, security.tokens.enabled)
        try:
            app = web_app(service, dashboard, config.client_write_timeout)
            http = await serve_http(config.http_listen, security, app)
        except BaseException:
            await running.stop(0)
            await cluster.close()
            raise
        dashboard.live.start()
    sweeper = asyncio.get_running_loop().create_task(cluster.sweep_forever(), name="sweep")
    return Queen(running, cluster, sweeper, service, http, dashboard)
