"""`python -m hive` / `apiary hive`: run this machine's hive in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

import grpc
import structlog

from apiary import logs
from apiary.serving import (
    RunningServer,
    host_port,
    start_server,
    stop_event_on_signals,
    write_port_file,
)
from hive.heartbeat import HeartbeatLoop
from hive.service import HiveService
from hive.supervisor import Supervisor, WorkerSpec
from protos.v1 import hive_pb2, hive_pb2_grpc

log = structlog.get_logger("hive")

SERVICE_NAMES = (hive_pb2.DESCRIPTOR.services_by_name["Hive"].full_name,)
DEFAULT_QUEEN = "127.0.0.1:7070"


def parse_spawn(text: str) -> tuple[WorkerSpec, int]:
    """'model=demo,backend=echo,count=2,slots=1,token_delay=0.05' -> spec and count.

    Keys other than model, backend, count, slots and device are backend options.
    """
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"--spawn part {part!r} is not KEY=VALUE")
        fields[key.strip()] = value.strip()
    if "model" not in fields:
        raise argparse.ArgumentTypeError("--spawn needs model=NAME")
    try:
        count = int(fields.pop("count", "1"))
        slots = int(fields.pop("slots", "1"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--spawn count/slots must be integers: {exc}") from None
    spec = WorkerSpec(
        model=fields.pop("model"),
        backend=fields.pop("backend", "echo"),
        slots=slots,
        device=fields.pop("device", "cpu"),
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
        "--heartbeat-interval",
        type=float,
        default=1.0,
        help="seconds; replaced by the interval the queen asks for",
    )
    p.add_argument(
        "--stop-grace",
        type=float,
        default=10.0,
        help="seconds a stopping worker gets before SIGKILL",
    )
    p.add_argument("--worker-host", default="127.0.0.1", help="host workers bind to")
    p.add_argument(
        "--spawn",
        action="append",
        default=[],
        type=parse_spawn,
        metavar="SPEC",
        help="start workers at boot, e.g. model=demo,backend=echo,count=2,token_delay=0.05",
    )
    p.add_argument("--port-file", default="", help="write the bound port here once listening")
    p.add_argument("--log-format", choices=["auto", "console", "json"], default=None)
    return p


async def run(args: argparse.Namespace) -> int:
    stop = stop_event_on_signals()
    supervisor = Supervisor(
        args.hive_id, "", stop_grace=args.stop_grace, worker_listen_host=args.worker_host
    )

    def register(server: grpc.aio.Server) -> None:
        hive_pb2_grpc.add_HiveServicer_to_server(HiveService(supervisor), server)

    try:
        running: RunningServer = await start_server(args.listen, register, SERVICE_NAMES)
    except OSError as exc:
        log.error("hive cannot start", error=str(exc))
        return 1
    address = args.advertise or host_port(args.listen, running.port)
    supervisor.hive_address = host_port(args.listen, running.port)
    heartbeat = HeartbeatLoop(
        args.queen, args.hive_id, address, supervisor.records, args.heartbeat_interval
    )
    supervisor.on_change = heartbeat.poke
    beat_task = asyncio.create_task(heartbeat.run(), name="heartbeat")
    if args.port_file:
        write_port_file(args.port_file, running.port)
    log.info("hive listening", address=address, queen=args.queen)
    for spec, count in args.spawn:
        for _ in range(count):
            await supervisor.spawn(spec)

    await stop.wait()
    log.info("hive stopping", workers=len(supervisor.workers))
    # Workers go STOPPING first (the queen stops routing to them), then finish in-flight work.
    await supervisor.stop_all()
    await heartbeat.leave()
    beat_task.cancel()
    await running.stop(1.0)
    log.info("hive stopped")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m hive") -> int:
    args = build_parser(prog).parse_args(argv)
    logs.configure("hive", args.log_format)
    structlog.contextvars.bind_contextvars(hive_id=args.hive_id)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
