"""`apiary up` (what `make run` starts): queen + one local hive + echo workers, in the foreground.

The queen and hive run as child processes exactly as they would on a real
cluster; Ctrl-C (or SIGTERM) stops the hive first, which stops its workers,
then the queen, and nothing is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import grpc
import structlog

from apiary import logs
from apiary.serving import stop_event_on_signals
from protos.v1 import queen_pb2, queen_pb2_grpc

log = structlog.get_logger("up")

CHILD_STOP_SECONDS = 20.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apiary up", description=__doc__.splitlines()[0])
    p.add_argument("--queen-listen", default="127.0.0.1:7070")
    p.add_argument("--hive-listen", default="127.0.0.1:7071")
    p.add_argument("--hive-id", default="local")
    p.add_argument("--model", default="", help="model name (default: demo, or the GGUF's name)")
    p.add_argument(
        "--gguf",
        default=os.environ.get("APIARY_MODEL", ""),
        help="serve this GGUF file with the llamacpp backend instead of echo (env APIARY_MODEL)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--slots", type=int, default=1)
    p.add_argument(
        "--token-delay",
        type=float,
        default=0.05,
        help="echo backend: seconds per token, so streaming is visible (echo is for demos/tests)",
    )
    p.add_argument("--log-format", choices=["auto", "console", "json"], default=None)
    return p


async def wait_ready(queen: str, model: str, workers: int, stop: asyncio.Event) -> bool:
    async with grpc.aio.insecure_channel(queen) as channel:
        stub = queen_pb2_grpc.QueenStub(channel)
        while not stop.is_set():
            try:
                reply = await stub.ListModels(queen_pb2.ListModelsRequest(), timeout=1.0)
                for info in reply.models:
                    if info.name == model and info.idle + info.busy >= workers:
                        return True
            except grpc.aio.AioRpcError:
                pass
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass
    return False


async def stop_child(name: str, proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), CHILD_STOP_SECONDS)
        except TimeoutError:
            log.warning("child did not stop; killing", child=name)
            proc.kill()
            await proc.wait()


def worker_spec(args: argparse.Namespace) -> tuple[str, str]:
    """(what the workers run on, in words; the hive's --spawn spec). Names the model if unset."""
    if args.gguf:
        path = args.gguf  # checked (and made absolute) in main(), before the loop started
        args.model = args.model or os.path.splitext(os.path.basename(path))[0]
        spawn = f"model={args.model},backend=llamacpp,count={args.workers},model_path={path}"
        return "the llamacpp backend", spawn
    args.model = args.model or "demo"
    spawn = (
        f"model={args.model},backend=echo,count={args.workers},slots={args.slots},"
        f"token_delay={args.token_delay}"
    )
    return "the echo backend (for demos and tests)", spawn


def banner(args: argparse.Namespace, backend: str) -> str:
    return (
        f"\nApiary is up: queen {args.queen_listen}, hive {args.hive_id!r} with "
        f"{args.workers} '{args.model}' worker(s) on {backend}.\n"
        "In a second terminal:\n"
        f"  .venv/bin/apiary infer {args.model} 'hello bees' --max-tokens 20\n"
        "  .venv/bin/apiary status\n"
        "Ctrl-C here stops everything.\n"
    )


async def run(args: argparse.Namespace) -> int:
    stop = stop_event_on_signals()
    fmt = ["--log-format", args.log_format] if args.log_format else []
    queen = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "queen", "--listen", args.queen_listen, *fmt
    )
    backend, spawn = worker_spec(args)
    hive = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hive",
        "--queen",
        args.queen_listen,
        "--listen",
        args.hive_listen,
        "--hive-id",
        args.hive_id,
        "--spawn",
        spawn,
        *fmt,
    )
    children = {"hive": hive, "queen": queen}
    waits = [asyncio.create_task(p.wait()) for p in children.values()]
    exited = asyncio.create_task(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED))
    ready = asyncio.create_task(wait_ready(args.queen_listen, args.model, args.workers, stop))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([ready, exited, stopped], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if ready.done() and ready.result():
        print(banner(args, backend), flush=True)
        await asyncio.wait([exited, stopped], return_when=asyncio.FIRST_COMPLETED)
    if exited.done():
        dead = [name for name, p in children.items() if p.returncode is not None]
        log.error("a cluster process exited; stopping the rest", exited=dead)
        code = 1
    ready.cancel()
    # Hive first: it stops its workers and tells the queen it is leaving.
    await stop_child("hive", hive)
    await stop_child("queen", queen)
    exited.cancel()
    stopped.cancel()
    log.info("apiary up: stopped")
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("up", args.log_format)
    if args.gguf:
        args.gguf = os.path.abspath(args.gguf)
        if not os.path.isfile(args.gguf):
            log.error("no such GGUF file", path=args.gguf)
            return 2
    return asyncio.run(run(args))
