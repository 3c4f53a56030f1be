"""`python -m queen` / `apiary queen start`: run the queen in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import structlog

from apiary import logs
from apiary.metrics import publish
from apiary.paths import StateDirBusy, claim, default_state_dir
from apiary.protoutil import enum_parser
from apiary.security import SecurityError, check_queen_tokens, security_from_args
from apiary.serving import add_server_args, stop_event_on_signals, write_port_file
from apiary.validation import (
    DEFAULT_MAX_PROMPT_BYTES,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MAX_TOKENS_CAP,
)
from protos.v1 import common_pb2
from queen.autospawn import SpawnPlan, parse_plan
from queen.beats import (
    BEAT_BURST,
    DEFAULT_BEATS_PER_INTERVAL,
    DEFAULT_MAX_WORKER_SLOTS,
    DEFAULT_MAX_WORKERS_PER_HIVE,
    BeatLimits,
)
from queen.http.openai.app import DEFAULT_WRITE_TIMEOUT
from queen.leases.manager import DEFAULT_MAX_TTL
from queen.requests.progress import DEFAULT_MIGRATION_LIMIT
from queen.routing.desk import DEFAULT_CACHE_WAIT, DEFAULT_MAX_WAIT
from queen.server import DEFAULT_SHUTDOWN_GRACE, Queen, QueenConfig, create_server

log = structlog.get_logger("queen")


def plan(text: str) -> SpawnPlan:
    try:
        return parse_plan(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_health_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        help="seconds between hive heartbeats; degraded after 2 missed, unhealthy after 3",
    )
    p.add_argument(
        "--hive-ttl",
        type=float,
        default=10.0,
        help="forget an unhealthy hive and its workers after this many intervals (default 10)",
    )
    p.add_argument(
        "--max-workers-per-hive",
        type=int,
        default=DEFAULT_MAX_WORKERS_PER_HIVE,
        help="worker records one heartbeat may carry (more is refused)",
    )
    p.add_argument(
        "--max-worker-slots",
        type=int,
        default=DEFAULT_MAX_WORKER_SLOTS,
        help="slots one worker may report (more is refused)",
    )
    p.add_argument(
        "--max-beats-per-interval",
        type=float,
        default=DEFAULT_BEATS_PER_INTERVAL,
        help=f"heartbeats one hive may send per interval after a burst of {BEAT_BURST:g} (more "
        f"are told to slow down; default {DEFAULT_BEATS_PER_INTERVAL:g}: one, and one more on "
        "a change)",
    )


def add_limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-queue", type=int, default=1024, help="requests waiting for a slot, in all"
    )
    p.add_argument(
        "--max-tokens-cap", type=int, default=DEFAULT_MAX_TOKENS_CAP,
        help="the most max_tokens a request may ask for",
    )  # fmt: skip
    p.add_argument(
        "--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
        help="max_tokens of a request that gives none (0)",
    )  # fmt: skip
    p.add_argument("--max-prompt-bytes", type=int, default=DEFAULT_MAX_PROMPT_BYTES)
    # Per client: the name its token has in the tokens file; with no tokens, its host.
    p.add_argument(
        "--max-streams-per-client", type=int, default=64,
        help="Infer streams one client may have open at once (0 = no limit)",
    )  # fmt: skip
    p.add_argument(
        "--max-queued-per-client", type=int, default=256,
        help="requests of one client waiting for a slot at once (0 = no limit)",
    )  # fmt: skip
    p.add_argument(
        "--max-leases-per-client", type=int, default=64,
        help="active direct leases (Queen.Lease) one client may hold (0 = no limit)",
    )  # fmt: skip
    p.add_argument(
        "--max-lease-ttl", type=float, default=DEFAULT_MAX_TTL,
        help=f"the longest ttl_seconds a lease may ask for (default {DEFAULT_MAX_TTL:g})",
    )  # fmt: skip
    p.add_argument(
        "--max-wait", type=float, default=DEFAULT_MAX_WAIT,
        help="the longest a request or lease waits for a free slot, whatever its deadline; "
        f"then DEADLINE_EXCEEDED (default {DEFAULT_MAX_WAIT:g})",
    )  # fmt: skip


def add_breaker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--breaker-failures",
        type=int,
        default=3,
        help="failures in a row that stop routing to a worker (0 = never)",
    )
    p.add_argument("--breaker-cooldown", type=float, default=10.0, help="seconds it stays out")


def add_routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-wait", type=float, default=DEFAULT_CACHE_WAIT,
        help="cache-aware: the longest a request waits for a busy worker holding its prompt's "
        "prefix before any free worker takes it (seconds)",
    )  # fmt: skip
    p.add_argument(
        "--cache-index-mb", type=int, default=64,
        help="cache-aware: memory for the index of which worker holds which prompt prefix",
    )  # fmt: skip
    p.add_argument(
        "--migration-limit", type=int, default=DEFAULT_MIGRATION_LIMIT,
        help="how many times a request may move mid-stream to another worker when its worker "
        "fails, continuing from the exact token it reached (0: never; the stream then ends)",
    )  # fmt: skip


def build_parser(prog: str = "python -m queen") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run the queen: registry and router.")
    p.add_argument("--listen", default="127.0.0.1:7070", help="host:port (default 127.0.0.1:7070)")
    p.add_argument(
        "--http-listen", default="", metavar="H:P",
        help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models) on host:port, e.g. 127.0.0.1:8080 (default: off)",
    )  # fmt: skip
    p.add_argument(
        "--http-port-file", default="", help="write the HTTP front's port here once listening"
    )
    p.add_argument(
        "--client-write-timeout", type=float, default=DEFAULT_WRITE_TIMEOUT, metavar="SECONDS",
        help="an HTTP client that takes nothing of its stream for this long is cut: its worker "
        f"stops and its slot is free (default {DEFAULT_WRITE_TIMEOUT:g}; 0 = never)",
    )  # fmt: skip
    add_health_args(p)
    p.add_argument(
        "--policy",
        type=enum_parser(common_pb2.RoutingPolicy, "ROUTING_POLICY_", "routing policy"),
        default=common_pb2.ROUTING_POLICY_UNSPECIFIED,
        help="routing policy for requests that name none (default: cache-aware for models on "
        "llamacpp workers, least-loaded for the rest)",
    )
    add_routing_args(p)
    add_limit_args(p)
    add_breaker_args(p)
    p.add_argument(
        "--autospawn",
        action="append",
        default=[],
        type=plan,
        metavar="MODEL=BACKEND[,K=V]",
        help="spawn a worker on demand when a request asks for MODEL and none serves it",
    )
    p.add_argument(
        "--hive-identity-from-cert",
        action="store_true",
        help="with mTLS: a hive's id must be a name in its client certificate",
    )
    p.add_argument(
        "--autospawn-catalog",
        action="store_true",
        help="spawn on demand any model a healthy hive has in its model catalog",
    )
    p.add_argument(
        "--state-dir", default="", help="request history (default $XDG_STATE_HOME/apiary/queen)"
    )
    p.add_argument(
        "--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE,
        help="on SIGTERM/SIGINT, seconds streams in flight get to finish before they are "
        f"ended (default {DEFAULT_SHUTDOWN_GRACE:g}; a second signal ends them at once)",
    )  # fmt: skip
    add_server_args(p)
    return p


def config_of(args: argparse.Namespace) -> QueenConfig:
    return QueenConfig(
        heartbeat_interval=args.heartbeat_interval,
        max_queue=args.max_queue,
        max_tokens_cap=args.max_tokens_cap,
        default_max_tokens=args.default_max_tokens,
        max_prompt_bytes=args.max_prompt_bytes,
        max_streams_per_client=args.max_streams_per_client,
        max_queued_per_client=args.max_queued_per_client,
        max_leases_per_client=args.max_leases_per_client,
        max_lease_ttl=args.max_lease_ttl,
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir("queen"),
        policy=args.policy,
        cache_wait=args.cache_wait,
        cache_index_mb=args.cache_index_mb,
        hive_ttl_intervals=args.hive_ttl,
        breaker_failures=args.breaker_failures,
        breaker_cooldown=args.breaker_cooldown,
        autospawn={p.model: p for p in args.autospawn},
        autospawn_catalog=args.autospawn_catalog,
        hive_identity_from_cert=args.hive_identity_from_cert,
        beat_limits=BeatLimits(
            args.max_workers_per_hive, args.max_worker_slots, args.max_beats_per_interval
        ),
        shutdown_grace=args.shutdown_grace,
        http_listen=args.http_listen,
        client_write_timeout=args.client_write_timeout,
        max_wait=args.max_wait,
        migration_limit=args.migration_limit,
    )


async def run(args: argparse.Namespace) -> int:
    stop = stop_event_on_signals()
    config = config_of(args)
    try:
        # One queen per state dir: two would write one request history.
        state_lock = claim(config.state_dir, "queen")
        security = security_from_args(args)
        check_queen_tokens(security.tokens)
        queen = await create_server(args.listen, config, security=security)
    except (OSError, SecurityError, StateDirBusy) as exc:
        log.error("queen cannot start", error=str(exc))
        return 1
    log.info("security", tokens=repr(security.tokens), tls=bool(security.tls.cert))
    if security.tokens.hive:
        log.warning(
            "a hive token shared by every hive is configured: whoever holds it can join as "
            "any hive id; prefer a token per hive (apiary certs add-hive ID)"
        )
    metrics = publish(args.listen, args.metrics_port, queen.cluster.metrics.prometheus, log)
    if args.port_file:
        write_port_file(args.port_file, queen.running.port)
    if args.http_port_file and queen.http is not None:
        write_port_file(args.http_port_file, queen.http.port)
    log.info(
        "queen listening",
        listen=args.listen,
        port=queen.running.port,
        heartbeat_interval=args.heartbeat_interval,
        policy=common_pb2.RoutingPolicy.Name(args.policy) if args.policy else "auto",
        state_dir=str(config.state_dir),
    )
    await stop.wait()
    log.info("queen stopping", shutdown_grace=config.shutdown_grace)
    stop.clear()
    hurry = asyncio.get_running_loop().create_task(hurry_on(stop, queen))
    await queen.stop(config.shutdown_grace)
    hurry.cancel()
    if metrics is not None:
        metrics.stop()
    state_lock.close()
    log.info("queen stopped")
    return 0


async def hurry_on(signalled: asyncio.Event, queen: Queen) -> None:
    """A second SIGTERM/SIGINT while the queen drains: end the grace now."""
    await signalled.wait()
    log.warning("signalled again: ending the streams left now")
    queen.hurry()


def args_problem(args: argparse.Namespace) -> str:
    if args.heartbeat_interval <= 0:
        return "--heartbeat-interval must be > 0"
    if args.max_beats_per_interval <= 0:
        return "--max-beats-per-interval must be > 0"
    if args.max_lease_ttl <= 0:
        return "--max-lease-ttl must be > 0"
    if args.migration_limit < 0:
        return "--migration-limit must be 0 or more"
    if args.max_wait <= 0:
        return "--max-wait must be > 0"
    if args.cache_wait < 0 or args.cache_index_mb < 1:
        return "--cache-wait must be >= 0 and --cache-index-mb >= 1"
    if args.shutdown_grace < 0:
        return "--shutdown-grace must be >= 0"
    if not 0 < args.default_max_tokens <= args.max_tokens_cap:
        return f"--default-max-tokens must be within 1..--max-tokens-cap ({args.max_tokens_cap})"
    for flag in ("max_streams_per_client", "max_queued_per_client", "max_leases_per_client"):
        if getattr(args, flag) < 0:
            return f"--{flag.replace('_', '-')} must be >= 0 (0 = no limit)"
    return ""


def main(argv: list[str] | None = None, prog: str = "python -m queen") -> int:
    args = build_parser(prog).parse_args(argv)
    problem = args_problem(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    logs.configure("queen", args.log_format)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
