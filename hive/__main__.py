"""`python -m hive` / `apiary hive`: run this machine's hive in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

import grpc
import structlog

from apiary import logs
from apiary.errors import StatusError
from apiary.metrics import publish
from apiary.options import parse_key_values
from apiary.paths import default_state_dir
from apiary.protoutil import enum_parser
from apiary.security import SecurityError, method_table, security_from_args
from apiary.serving import (
    RunningServer,
    add_server_args,
    host_port,
    start_server,
    stop_event_on_signals,
    write_port_file,
)
from hive.catalog import Catalog
from hive.heartbeat import HeartbeatLoop
from hive.metrics import hive_metrics
from hive.policy import RestartSettings
from hive.records import hive_stats, worker_records
from hive.service import HiveService
from hive.spec import WorkerSpec
from hive.states import LifecycleSettings
from hive.store import StateDirBusy, WorkerStore
from hive.supervisor import Supervisor, SupervisorSettings
from hive.worker_client import WorkerClient
from protos.v1 import common_pb2, hive_pb2, hive_pb2_grpc, queen_pb2
from worker.backends import backend_names, describe_backend

log = structlog.get_logger("hive")

SERVICE_NAMES = (hive_pb2.DESCRIPTOR.services_by_name["Hive"].full_name,)
# Workers call back with the worker token; everything else on a hive is for admins (and the
# queen, which forwards admin calls with the admin token).
METHODS = method_table(
    **{
        "apiary.v1.Hive": frozenset({"admin"}),
        "apiary.v1.Hive/ReportReady": frozenset({"worker"}),
        "apiary.v1.Hive/ReportLoading": frozenset({"worker"}),
    }
)
DEFAULT_QUEEN = "127.0.0.1:7070"
parse_policy = enum_parser(common_pb2.RestartPolicy, "RESTART_POLICY_", "restart policy")


def parse_spawn(text: str) -> tuple[WorkerSpec, int]:
    """'model=demo,backend=echo,count=2,restart=always,tags=gpu+eu,token_delay=0.05' -> spec, count.

    Keys other than model, backend, count, slots, device, restart and tags (joined by +)
    are backend options.
    """
    try:
        fields = parse_key_values(text.split(","), "--spawn part")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if "model" not in fields:
        raise argparse.ArgumentTypeError("--spawn needs model=NAME")
    try:
        count = int(fields.pop("count", "1"))
        slots = int(fields.pop("slots", "1"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--spawn count/slots must be integers: {exc}") from None
    restart = fields.pop("restart", "")
    tags = [t for t in fields.pop("tags", "").split("+") if t]
    spec = WorkerSpec(
        model=fields.pop("model"),
        backend=fields.pop("backend", "echo"),
        slots=slots,
        device=fields.pop("device", "cpu"),
        restart_policy=parse_policy(restart) if restart else common_pb2.RESTART_POLICY_UNSPECIFIED,
        tags=tags,
        backend_options=fields,
    )
    return spec, count


def build_parser(prog: str = "python -m hive") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run a hive: spawns and supervises workers.")
    p.add_argument(
        "--queen", default=DEFAULT_QUEEN, help=f"queen address (default {DEFAULT_QUEEN})"
    )
    p.add_argument("--listen", default="127.0.0.1:7071", help="host:port for the Hive service")
    p.add_argument(
        "--advertise",
        default="",
        help="address the queen dials to reach this hive (default: listen)",
    )
    p.add_argument("--hive-id", default=socket.gethostname(), help="default: the host name")
    p.add_argument(
        "--state-dir",
        default="",
        help="worker table and worker logs (default $XDG_STATE_HOME/apiary/hive-ID)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        help="seconds; replaced by the interval the queen asks for",
    )
    p.add_argument(
        "--stop-grace",
        type=float,
        default=10.0,
        help="seconds a stopping worker gets to finish in-flight streams",
    )
    p.add_argument("--term-grace", type=float, default=3.0, help="seconds from SIGTERM to SIGKILL")
    p.add_argument("--health-interval", type=float, default=5.0, help="seconds between checks")
    p.add_argument("--health-timeout", type=float, default=2.0, help="deadline of one check")
    p.add_argument("--load-timeout", type=float, default=120.0, help="max seconds in LOADING")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        help="retire workers idle this long (0 = never)",
    )
    p.add_argument(
        "--restart-policy",
        type=parse_policy,
        default=common_pb2.RESTART_POLICY_ON_FAILURE,
        help="default for workers spawned without one: never, on-failure (default), always",
    )
    p.add_argument("--restart-backoff", type=float, default=1.0, help="first restart delay (s)")
    p.add_argument("--restart-backoff-max", type=float, default=60.0, help="cap on it (s)")
    p.add_argument("--worker-host", default="127.0.0.1", help="host workers bind to")
    p.add_argument("--models-dir", default="", help="model catalog (default STATE_DIR/models)")
    p.add_argument(
        "--spawn",
        action="append",
        default=[],
        type=parse_spawn,
        metavar="SPEC",
        help="keep workers running from boot, e.g. model=demo,backend=echo,count=2,restart=always"
        " (re-adopted workers count)",
    )
    add_server_args(p)
    return p


def settings_from(args: argparse.Namespace) -> SupervisorSettings:
    return SupervisorSettings(
        lifecycle=LifecycleSettings(
            stop_grace=args.stop_grace,
            term_grace=args.term_grace,
            load_timeout=args.load_timeout,
            idle_timeout=args.idle_timeout,
            restart=RestartSettings(
                initial_backoff=args.restart_backoff, max_backoff=args.restart_backoff_max
            ),
        ),
        health_interval=args.health_interval,
        health_timeout=args.health_timeout,
        default_policy=args.restart_policy,
        worker_host=args.worker_host,
    )


async def run(args: argparse.Namespace) -> int:
    stop = stop_event_on_signals()
    store = WorkerStore(
        Path(args.state_dir) if args.state_dir else default_state_dir(f"hive-{args.hive_id}")
    )
    try:
        store.lock()
    except StateDirBusy as exc:
        log.error("hive cannot start", error=str(exc))
        return 1
    try:
        security = security_from_args(args)
    except SecurityError as exc:
        log.error("hive cannot start", error=str(exc))
        return 1
    supervisor = Supervisor(
        args.hive_id, "", store, settings_from(args), client=WorkerClient(security),
        security=security,
    )  # fmt: skip
    catalog = Catalog(Path(args.models_dir) if args.models_dir else store.state_dir / "models")
    service = HiveService(supervisor, catalog)

    def register(server: grpc.aio.Server) -> None:
        hive_pb2_grpc.add_HiveServicer_to_server(service, server)

    try:
        running: RunningServer = await start_server(
            args.listen, register, SERVICE_NAMES, security=security, methods=METHODS
        )
    except (OSError, SecurityError) as exc:
        log.error("hive cannot start", error=str(exc))
        return 1
    address = args.advertise or host_port(args.listen, running.port)
    supervisor.hive_address = host_port(args.listen, running.port)
    # Before the first heartbeat, so the queen sees re-adopted workers as the same workers.
    await supervisor.adopt()
    heartbeat = HeartbeatLoop(
        args.queen,
        args.hive_id,
        address,
        lambda: worker_records(supervisor),
        args.heartbeat_interval,
        stats=lambda: hive_stats(supervisor),
        sample=supervisor.sample_resources,
        backends=[n for n in backend_names() if describe_backend(n).available],
        catalog=lambda: [
            queen_pb2.CatalogEntry(model=e.name, backend=e.backend)
            for e in catalog.cached_entries()
        ],
        security=security,
    )
    supervisor.on_change = heartbeat.poke
    tasks = [
        asyncio.create_task(heartbeat.run(), name="heartbeat"),
        asyncio.create_task(supervisor.monitor_forever(), name="monitor"),
    ]
    metrics = publish(args.listen, args.metrics_port, hive_metrics(supervisor), log)
    if args.port_file:
        write_port_file(args.port_file, running.port)
    log.info("hive listening", address=address, queen=args.queen, state_dir=str(store.state_dir))
    for spec, count in args.spawn:
        try:
            await supervisor.ensure(service.prepare(spec), count)
        except StatusError as refused:
            log.error("cannot spawn", spec=str(spec), error=refused.message)

    await stop.wait()
    log.info("hive stopping", workers=len(supervisor.workers))
    tasks[1].cancel()
    # Workers go STOPPING first (the queen stops routing to them), then finish in-flight work.
    await supervisor.stop_all()
    await heartbeat.leave()
    tasks[0].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await supervisor.close()
    await running.stop(1.0)
    store.unlock()
    if metrics is not None:
        metrics.stop()
    log.info("hive stopped")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m hive") -> int:
    args = build_parser(prog).parse_args(argv)
    logs.configure("hive", args.log_format)
    structlog.contextvars.bind_contextvars(hive_id=args.hive_id)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
