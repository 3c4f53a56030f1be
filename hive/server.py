"""Wiring a hive: the worker table, the Hive service, the heartbeat loop and the health monitor."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from apiary.client.queens import queens_from
from apiary.security import OPEN, Security, method_table
from apiary.serving import RunningServer, host_port, start_server
from hive.adoption import adopt
from hive.boot import BootWorkers
from hive.catalog import Catalog
from hive.drains import Drains
from hive.heartbeat import HeartbeatLoop
from hive.monitor import monitor_forever, sample_resources
from hive.records import heartbeat_table, hive_stats
from hive.service import HiveService
from hive.store import WorkerStore
from hive.supervisor import Supervisor, SupervisorSettings
from hive.worker_client import WorkerClient
from protos.v1 import hive_pb2, hive_pb2_grpc, queen_pb2
from worker.backends import backend_names, describe_backend

log = structlog.get_logger("hive")

SERVICE_NAMES = (hive_pb2.DESCRIPTOR.services_by_name["Hive"].full_name,)
# Everything on a hive is for its queen (which calls with its own credential, for operators
# and autospawn). Workers report with their own credential, which names one worker: the
# handlers check it against the worker id in the request, so these are open here.
METHODS = method_table(
    **{
        "apiary.v1.Hive": frozenset({"queen"}),
        "apiary.v1.Hive/ReportReady": OPEN,
        "apiary.v1.Hive/ReportLoading": OPEN,
    }
)


@dataclass
class HiveConfig:
    hive_id: str
    # One queen's address, or several separated by commas: the hive heartbeats to each, so
    # every queen knows the whole cluster and routes on its own.
    queen: str
    listen: str
    # The address the queen dials (default: the listen address with the bound port).
    advertise: str = ""
    heartbeat_interval: float = 1.0
    models_dir: Path | None = None
    # Catalog pulls may follow symlinks that lead out of the source's directory.
    allow_symlinks: bool = False
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)


@dataclass
class Hive:
    running: RunningServer
    supervisor: Supervisor
    service: HiveService
    # One loop per queen.
    heartbeats: list[HeartbeatLoop]
    tasks: list[asyncio.Task[None]]
    # The --spawn entries, kept at their counts.
    boot: BootWorkers

    async def stop(self) -> None:
        """Workers go STOPPING first (the queen stops routing to them), finish their streams,
        then the hive says it is leaving and stops serving."""
        # Health watchers (and load balancers) hear it first.
        await self.running.health.enter_graceful_shutdown()
        self.tasks[0].cancel()  # no health checks on workers being stopped
        await self.supervisor.stop_all()
        await asyncio.gather(*(beat.leave() for beat in self.heartbeats))
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.supervisor.close()
        await self.running.stop(1.0)


def available_backends() -> list[str]:
    return [name for name in backend_names() if describe_backend(name).available]


async def create_server(config: HiveConfig, store: WorkerStore, security: Security) -> Hive:
    """Serve, re-adopt the workers of a previous run, then start heartbeating."""
    supervisor = Supervisor(
        config.hive_id, "", store, config.supervisor,
        client=WorkerClient(security, config.hive_id),
        security=security,
    )  # fmt: skip
    boot = BootWorkers(supervisor)
    catalog = Catalog(config.models_dir or store.state_dir / "models", config.allow_symlinks)
    drains = Drains.load(store.state_dir / "drains.json")
    service = HiveService(supervisor, catalog, drains)

    def register(server: grpc.aio.Server) -> None:
        hive_pb2_grpc.add_HiveServicer_to_server(service, server)

    running = await start_server(
        config.listen, register, SERVICE_NAMES, security=security, methods=METHODS
    )
    supervisor.hive_address = host_port(config.listen, running.port)
    # Before the first heartbeat, so the queen sees re-adopted workers as the same workers.
    await adopt(supervisor)
    backends = available_backends()  # what this machine can run: found once, told to all
    heartbeats = [
        # One loop samples the workers' cpu and memory for all: each sample is "since the
        # previous one", and the queens are told the same figures.
        heartbeat_loop(queen, config, supervisor, catalog, security, drains, backends, n == 0)
        for n, queen in enumerate(queens_from(config.queen))
    ]

    def poke_all() -> None:
        for beat in heartbeats:
            beat.poke()

    supervisor.on_change = poke_all
    tasks = [
        asyncio.create_task(monitor_forever(supervisor), name="monitor"),
        *(asyncio.create_task(b.run(), name=f"heartbeat to {b.queen}") for b in heartbeats),
    ]
    return Hive(running, supervisor, service, heartbeats, tasks, boot)


def heartbeat_loop(
    queen: str, config: HiveConfig, supervisor: Supervisor, catalog: Catalog, security: Security,
    drains: Drains, backends: list[str], samples: bool,
) -> HeartbeatLoop:  # fmt: skip
    return HeartbeatLoop(
        queen,
        config.hive_id,
        config.advertise or supervisor.hive_address,
        lambda: heartbeat_table(supervisor),
        config.heartbeat_interval,
        stats=lambda: hive_stats(supervisor),
        sample=(lambda: sample_resources(supervisor)) if samples else lambda: None,
        backends=backends,
        catalog=lambda: [
            queen_pb2.CatalogEntry(model=e.name, backend=e.backend)
            for e in catalog.cached_entries()
        ],
        security=security,
        problems=lambda: [supervisor.persist_error] if supervisor.persist_error else [],
        instance=supervisor.launcher.instance.nonce,
        drains=lambda: (drains.hive, drains.of(supervisor.workers)),
    )
