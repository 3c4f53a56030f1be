"""`python -m hive` / `apiary hive start`: run this machine's hive in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket
import sys
from pathlib import Path

import structlog

from apiary import logs
from apiary.errors import StatusError
from apiary.metrics import publish
from apiary.options import parse_key_values
from apiary.paths import StateDirBusy, default_state_dir
from apiary.protoutil import enum_parser
from apiary.security import SecurityError, check_hive_tokens, security_from_args
from apiary.serving import (
    add_server_args,
    stop_event_on_signals,
    write_port_file,
)
from hive.metrics import hive_metrics
from hive.policy import RestartSettings
from hive.server import HiveConfig, create_server
from hive.spec import WorkerSpec
from hive.states import LifecycleSettings
from hive.store import WorkerStore
from hive.supervisor import SupervisorSettings
from protos.v1 import common_pb2

log = structlog.get_logger("hive")

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
        slots = int(fields.pop("slots", "0"))  # 0: the backend's default
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--spawn count/slots must be integers: {exc}") from None
    restart = fields.pop("restart", "")
    tags = [t for t in fields.pop("tags", "").split("+") if t]
    idle_retire = fields.pop("idle_retire", "0").lower() in ("1", "true", "yes")
    spec = WorkerSpec(
        idle_retire=idle_retire,
        model=fields.pop("model"),
        backend=fields.pop("backend", ""),  # none: the catalog's, never a guess
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
        "--queen", default=DEFAULT_QUEEN, metavar="A[,B...]",
        help=f"queen address, or several separated by commas: the hive heartbeats to each "
        f"(default {DEFAULT_QUEEN})",
    )  # fmt: skip
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
    add_supervision_args(p)
    p.add_argument("--worker-host", default="127.0.0.1", help="host workers bind to")
    p.add_argument("--models-dir", default="", help="model catalog (default STATE_DIR/models)")
    p.add_argument(
        "--allow-symlinks",
        action="store_true",
        help="let `model pull` of a local path follow a symlink out of the file's directory",
    )
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


def add_supervision_args(p: argparse.ArgumentParser) -> None:
    """How the hive watches, stops, restarts and retires its workers."""
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
        help="retire workers idle this long (0 = never); --spawn workers are kept unless "
        "their entry says idle_retire=1",
    )
    p.add_argument(
        "--orphan-timeout",
        type=float,
        default=60.0,
        help="a worker whose hive is gone (not restarted within this long) stops by itself; "
        "at least 3 health intervals (0 = never)",
    )
    p.add_argument(
        "--failed-ttl",
        type=float,
        default=600.0,
        help="drop FAILED workers that will not restart from the table after this long "
        "(0 = keep them)",
    )
    p.add_argument(
        "--restart-policy",
        type=parse_policy,
        default=common_pb2.RESTART_POLICY_ON_FAILURE,
        help="default for workers spawned without one: never, on-failure (default), always",
    )
    p.add_argument("--restart-backoff", type=float, default=1.0, help="first restart delay (s)")
    p.add_argument("--restart-backoff-max", type=float, default=60.0, help="cap on it (s)")


def settings_from(args: argparse.Namespace) -> SupervisorSettings:
    return SupervisorSettings(
        lifecycle=LifecycleSettings(
            stop_grace=args.stop_grace,
            term_grace=args.term_grace,
            load_timeout=args.load_timeout,
            idle_timeout=args.idle_timeout,
            failed_ttl=args.failed_ttl,
            restart=RestartSettings(
                initial_backoff=args.restart_backoff, max_backoff=args.restart_backoff_max
            ),
        ),
        health_interval=args.health_interval,
        health_timeout=args.health_timeout,
        default_policy=args.restart_policy,
        worker_host=args.worker_host,
        orphan_timeout=args.orphan_timeout,
    )


def config_from(args: argparse.Namespace) -> HiveConfig:
    return HiveConfig(
        hive_id=args.hive_id,
        queen=args.queen,
        listen=args.listen,
        advertise=args.advertise,
        heartbeat_interval=args.heartbeat_interval,
        models_dir=Path(args.models_dir) if args.models_dir else None,
        allow_symlinks=args.allow_symlinks,
        supervisor=settings_from(args),
    )


async def run(args: argparse.Namespace) -> int:
    stop = stop_event_on_signals()
    store = WorkerStore(
        Path(args.state_dir) if args.state_dir else default_state_dir(f"hive-{args.hive_id}")
    )
    try:
        store.lock()
        security = security_from_args(args)
        check_hive_tokens(security.tokens, args.hive_id)
        # Only what is this hive's: anything else in its tokens file stays unused.
        security = dataclasses.replace(security, tokens=security.tokens.as_hive(args.hive_id))
        security.check_listen(f"{args.worker_host}:0", flag="--worker-host")
        hive = await create_server(config_from(args), store, security)
    except (StateDirBusy, SecurityError, OSError) as exc:
        log.error("hive cannot start", error=str(exc))
        store.unlock()
        return 1
    metrics = publish(args.listen, args.metrics_port, hive_metrics(hive.supervisor), log)
    if args.port_file:
        write_port_file(args.port_file, hive.running.port)
    log.info(
        "hive listening",
        address=hive.heartbeats[0].hive_address,
        queen=args.queen,
        state_dir=str(store.state_dir),
    )
    engines = sum(count for spec, count in args.spawn if hive.service.uses_threads(spec))
    booting: dict[str, int] = {}  # threads given to the specs prepared so far
    for spec, count in args.spawn:
        try:
            prepared = hive.service.prepare(spec, count, among=engines, booting=booting)
            hive.boot.entries.append((prepared, count))
        except StatusError as refused:
            log.error("cannot spawn", spec=str(spec), error=refused.message)
    await hive.boot.keep()
    await stop.wait()
    log.info("hive stopping", workers=len(hive.supervisor.workers))
    await hive.stop()
    store.unlock()
    if metrics is not None:
        metrics.stop()
    log.info("hive stopped")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m hive") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if 0 < args.orphan_timeout < 3 * args.health_interval:
        # Workers would stop themselves between two health checks of a live hive.
        parser.error(
            f"--orphan-timeout {args.orphan_timeout:g} must be at least 3 health intervals "
            f"({3 * args.health_interval:g}s), or 0"
        )
    logs.configure("hive", args.log_format)
    structlog.contextvars.bind_contextvars(hive_id=args.hive_id)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
