"""`python -m worker`: one worker process, spawned by its hive (or by hand for experiments)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc
import structlog

from apiary import logs
from apiary.options import parse_key_values
from apiary.security import Security, TlsFiles, TokenSet
from apiary.serving import RunningServer, host_port, set_serving, stop_event_on_signals
from apiary.validation import DEFAULT_MAX_TOKENS_CAP
from protos.v1 import common_pb2, hive_pb2, hive_pb2_grpc
from worker.backends import backend_names, create_backend
from worker.orphans import stop_when_orphaned
from worker.server import SERVICE_NAMES, WorkerIdentity, WorkerService, create_server

log = structlog.get_logger("worker")

WORKER_TOKEN_ENV = "APIARY_WORKER_TOKEN"

# How long a worker keeps trying to reach its hive with the ready callback.
READY_REPORT_SECONDS = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    p.add_argument("--worker-id", required=True)
    p.add_argument("--hive-id", default="")
    p.add_argument("--hive", default="", help="hive address for the ready callback (host:port)")
    p.add_argument("--model", required=True)
    p.add_argument(
        "--backend", required=True, help=f"one of: {', '.join(backend_names())} (echo: tests only)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--slots", type=int, default=1, help="concurrent requests (default 1)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="backend option"
    )
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--max-tokens-cap", type=int, default=DEFAULT_MAX_TOKENS_CAP)
    p.add_argument(
        "--stop-grace", type=float, default=5.0, help="seconds in-flight streams get on SIGTERM"
    )
    p.add_argument("--log-format", choices=["auto", "console", "json"], default=None)
    p.add_argument("--tls-cert", default="", help="this worker's certificate (its hive's)")
    p.add_argument("--tls-key", default="")
    p.add_argument("--tls-ca", default="", help="CA to verify the hive with")
    p.add_argument("--tls-client-ca", default="", help="require client certificates (mTLS)")
    p.add_argument(
        "--orphan-timeout",
        type=float,
        default=0.0,
        help="stop once the hive has not asked after this worker for this long (0 = never)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening beyond loopback without tokens (its hive passes it on)",
    )
    return p.parse_args(argv)


async def report_ready(hive: str, request: hive_pb2.ReportReadyRequest, security: Security) -> bool:
    """Tell the hive we are ready (or failed to load); False if it does not know us."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_REPORT_SECONDS
    async with security.aio_channel(hive, security.tokens.worker) as channel:
        stub = hive_pb2_grpc.HiveStub(channel)
        while True:
            try:
                await stub.ReportReady(request, timeout=5.0)
                return True
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    log.error(
                        "hive refused ready report", code=exc.code().name, detail=exc.details()
                    )
                    return False
                if loop.time() > deadline:
                    log.error("hive unreachable for ready report", hive=hive, detail=exc.details())
                    return False
                await asyncio.sleep(0.2)


async def report_loading(
    args: argparse.Namespace, service: WorkerService, loading: asyncio.Task[None]
) -> None:
    """While loading, tell the hive how far along we are, when it changes (at most 4 times/s)."""
    if not args.hive:
        return
    sent: tuple[float, str] | None = None
    async with args.security.aio_channel(args.hive, args.security.tokens.worker) as channel:
        stub = hive_pb2_grpc.HiveStub(channel)
        while not loading.done():
            now = (service.load_progress, service.status_detail)
            if now != sent:
                try:
                    await stub.ReportLoading(
                        hive_pb2.ReportLoadingRequest(
                            worker_id=args.worker_id,
                            pid=os.getpid(),
                            progress=now[0],
                            detail=now[1],
                        ),
                        timeout=1.0,
                    )
                    sent = now
                except grpc.aio.AioRpcError:
                    pass  # progress is a courtesy; the ready report is what counts
            await asyncio.sleep(0.25)


async def report_load_error(args: argparse.Namespace, message: str) -> None:
    """Tell the hive (if any) that this worker will not serve, and why."""
    if args.hive:
        await report_ready(
            args.hive,
            hive_pb2.ReportReadyRequest(
                worker_id=args.worker_id, pid=os.getpid(), load_error=message
            ),
            args.security,
        )


def identity_of(args: argparse.Namespace, options: dict[str, str]) -> WorkerIdentity:
    return WorkerIdentity(
        worker_id=args.worker_id,
        hive_id=args.hive_id,
        model=args.model,
        backend=args.backend,
        device=args.device,
        slots=max(args.slots, 1),
        backend_options=options,
    )


async def load(
    args: argparse.Namespace, service: WorkerService, stop: asyncio.Event
) -> asyncio.Task[None] | None:
    """Load the backend, reporting progress; the finished load, or None if asked to stop first."""

    def progress(fraction: float, detail: str) -> None:
        # Called by the backend, maybe from its own thread: just remember the latest.
        service.load_progress, service.status_detail = fraction, detail

    loading = asyncio.create_task(service.backend.load(progress))
    stopping = asyncio.create_task(stop.wait())
    reporting = asyncio.create_task(report_loading(args, service, loading))
    await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
    reporting.cancel()
    if not loading.done():
        # Asked to stop while loading: do not finish a load nobody wants.
        loading.cancel()
        return None
    stopping.cancel()
    return loading


async def serve(
    args: argparse.Namespace, service: WorkerService, running: RunningServer, address: str
) -> int:
    """Loaded: serve until asked to stop (exit code 4 if the hive does not know us)."""
    service.ready = True
    service.load_progress, service.status_detail = 1.0, "ready"
    await set_serving(running, SERVICE_NAMES, True)
    if args.hive:
        backend = service.backend
        task = common_pb2.WORKER_TASK_EMBED if backend.embeds else common_pb2.WORKER_TASK_GENERATE
        ready = hive_pb2.ReportReadyRequest(
            worker_id=args.worker_id, address=address, pid=os.getpid(), task=task,
            context_length=backend.context_length, features=backend.features(),
        )  # fmt: skip
        ok = await report_ready(args.hive, ready, args.security)
        if not ok:
            await running.server.stop(0)
            return 4
    log.info("worker ready", address=address)
    service.heard_from_hive = service.clock.monotonic()
    watchdog = asyncio.create_task(stop_when_orphaned(service, args.orphan_timeout, service.clock))
    await service.stop.wait()
    watchdog.cancel()
    log.info("worker stopping", in_flight=service.slots.in_flight, grace=service.stop_grace)
    await running.stop(service.stop_grace)
    await service.backend.close()
    log.info("worker stopped")
    return 0


async def run(args: argparse.Namespace) -> int:
    stop = stop_event_on_signals()
    try:
        options = parse_key_values(args.option, "backend option")
        backend = create_backend(args.backend, args.model, options, max(args.slots, 1))
    except (KeyError, ValueError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        log.error("bad backend configuration", error=message)
        await report_load_error(args, message)
        return 2
    service = WorkerService(
        identity_of(args, options),
        backend,
        max_tokens_cap=args.max_tokens_cap,
        stop=stop,
        stop_grace=args.stop_grace,
        tokens=args.security.tokens,
    )
    running = await create_server(args.listen, service, args.security)
    address = host_port(args.listen, running.port)
    log.info("worker listening, loading backend", address=address, model=args.model)
    loading = await load(args, service, stop)
    if loading is None:
        log.info("stopped while loading")
        await running.server.stop(0)
        return 0
    load_error = loading.exception()
    if load_error is not None:
        log.error("backend failed to load", error=repr(load_error))
        await report_load_error(args, f"load failed: {load_error}")
        await running.server.stop(0)
        return 3
    return await serve(args, service, running, address)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure("worker", args.log_format)
    # The worker token comes from the hive through the environment, never the command line.
    args.security = Security(
        tokens=TokenSet(worker=os.environ.get(WORKER_TOKEN_ENV, "")),
        tls=TlsFiles(args.tls_cert, args.tls_key, args.tls_ca, args.tls_client_ca),
        # Beyond loopback without tokens only if its hive was told --insecure (and says so).
        insecure=args.insecure,
    )
    structlog.contextvars.bind_contextvars(worker_id=args.worker_id, hive_id=args.hive_id)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
