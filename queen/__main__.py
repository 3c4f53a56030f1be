"""`python -m queen` / `apiary queen`: run the queen in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog

from apiary import logs
from apiary.serving import stop_event_on_signals, write_port_file
from apiary.validation import DEFAULT_MAX_TOKENS_CAP
from queen.server import QueenConfig, create_server

log = structlog.get_logger("queen")


def build_parser(prog: str = "python -m queen") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run the queen: registry and router.")
    p.add_argument("--listen", default="127.0.0.1:7070", help="host:port (default 127.0.0.1:7070)")
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        help="seconds between hive heartbeats; a hive silent for 3 intervals is unhealthy",
    )
    p.add_argument(
        "--max-queue", type=int, default=1024, help="requests waiting for a slot, in all"
    )
    p.add_argument("--max-tokens-cap", type=int, default=DEFAULT_MAX_TOKENS_CAP)
    p.add_argument("--port-file", default="", help="write the bound port here once listening")
    p.add_argument("--log-format", choices=["auto", "console", "json"], default=None)
    return p


async def run(args: argparse.Namespace) -> int:
    stop = stop_event_on_signals()
    config = QueenConfig(args.heartbeat_interval, args.max_queue, args.max_tokens_cap)
    try:
        queen = await create_server(args.listen, config)
    except OSError as exc:
        log.error("queen cannot start", error=str(exc))
        return 1
    if args.port_file:
        write_port_file(args.port_file, queen.running.port)
    log.info(
        "queen listening",
        listen=args.listen,
        port=queen.running.port,
        heartbeat_interval=args.heartbeat_interval,
    )
    await stop.wait()
    log.info("queen stopping")
    await queen.stop(2.0)
    log.info("queen stopped")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m queen") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.heartbeat_interval <= 0:
        print("--heartbeat-interval must be > 0", file=sys.stderr)
        return 2
    logs.configure("queen", args.log_format)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
