"""The hive's heartbeat loop: its full worker table to the queen each interval and on change."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence

import grpc
import psutil
import structlog

from apiary.security import Security
from apiary.serving import CHANNEL_OPTIONS
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc

log = structlog.get_logger("hive.heartbeat")

# What the queen may refuse a heartbeat for, and what an operator should check.
REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: "the hive's token: --tokens-file or --hive-token",
    grpc.StatusCode.PERMISSION_DENIED: "that the token (or certificate) is this hive's: "
    "--hive-id, --tokens-file, --tls-cert",
    grpc.StatusCode.ALREADY_EXISTS: "that no other running hive uses this --hive-id",
    grpc.StatusCode.INVALID_ARGUMENT: "the hive's --advertise address, --hive-id and spawn specs",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "that only one hive process heartbeats as this --hive-id",
}


def connection_hint(details: str) -> str:
    """What to check when the queen cannot be reached, from grpc's own words."""
    lowered = details.lower()
    if "handshake" in lowered or "ssl" in lowered or "certificate" in lowered:
        return (
            "TLS: --tls-ca names the CA that signed the queen's certificate (and, if the "
            "queen requires client certificates, --tls-cert/--tls-key)"
        )
    return "that the queen runs and --queen is its address"


def machine_resources() -> queen_pb2.HiveResources:
    memory = psutil.virtual_memory()
    return queen_pb2.HiveResources(
        cpu_count=psutil.cpu_count() or 0,
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        load_1m=os.getloadavg()[0],
    )


class HeartbeatLoop:
    def __init__(
        self,
        queen: str,
        hive_id: str,
        hive_address: str,
        # The worker table: records, and samples of what changes every beat.
        workers: Callable[[], tuple[list[common_pb2.WorkerRecord], list[common_pb2.WorkerSample]]],
        interval: float = 1.0,
        stats: Callable[[], queen_pb2.HiveStats] = queen_pb2.HiveStats,
        sample: Callable[[], None] = lambda: None,
        backends: Sequence[str] = (),
        catalog: Callable[[], list[queen_pb2.CatalogEntry]] = list,
        security: Security | None = None,
        problems: Callable[[], list[str]] = list,
        instance: str = "",
        # The hive's drains: whether it is drained, and which of its workers are.
        drains: Callable[[], tuple[bool, list[str]]] = lambda: (False, []),
    ) -> None:
        self.instance = instance
        self.drains = drains
        self.problems = problems
        security = security or Security()
        self.backends = list(backends)
        self.catalog = catalog
        self.stats = stats
        self.sample = sample
        self.queen = queen
        self.hive_id = hive_id
        self.hive_address = hive_address
        self.workers = workers
        self.interval = interval
        self.sequence = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._queen_reachable: bool | None = None
        token = security.tokens.hive_token(hive_id)  # its own, else the one all hives share
        self._channel = security.aio_channel(queen, token, CHANNEL_OPTIONS)
        self._stub = queen_pb2_grpc.QueenRegistryStub(self._channel)

    def poke(self) -> None:
        """Send a heartbeat now (a worker changed state): the queen should not wait an interval."""
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self.send_once()
            except Exception:
                # The loop must never die silently: log and keep the beat.
                log.exception("heartbeat step failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass

    async def send_once(self, leaving: bool = False) -> bool:
        self.sequence += 1
        self.sample()
        records, samples = ([], []) if leaving else self.workers()
        drained, drained_workers = self.drains()
        beat = queen_pb2.HiveHeartbeat(
            drained=drained,
            drained_workers=drained_workers,
            stats=self.stats(),
            backends=self.backends,
            catalog=self.catalog(),
            hive_id=self.hive_id,
            address=self.hive_address,
            resources=machine_resources(),
            workers=records,
            samples=samples,
            leaving=leaving,
            sequence=self.sequence,
            problems=self.problems(),
            instance=self.instance,
        )
        try:
            reply = await self._stub.Heartbeat(beat, timeout=max(self.interval * 2, 1.0))
        except grpc.aio.AioRpcError as exc:
            self._say_why(exc)
            self._queen_reachable = False
            return False
        if self._queen_reachable is not True:
            log.info("heartbeating to queen", queen=self.queen, interval=reply.interval_seconds)
        self._queen_reachable = True
        if reply.interval_seconds > 0:
            self.interval = reply.interval_seconds
        return True

    def _say_why(self, exc: grpc.aio.AioRpcError) -> None:
        """A refusal is said on every retry (nothing heals it but a fix); an unreachable queen
        once, until it answers again."""
        code, details = exc.code(), exc.details() or ""
        fix = REFUSALS.get(code)
        if fix is not None:
            log.error("queen refused the heartbeat", queen=self.queen, code=code.name,
                      detail=details, check=fix)  # fmt: skip
        elif self._queen_reachable is not False:
            log.warning(
                "queen unreachable; will keep trying",
                queen=self.queen,
                code=code.name,
                detail=details,
                check=connection_hint(details),
            )

    async def leave(self) -> None:
        """Tell the queen we are going, so it drops our workers now rather than after a timeout."""
        self._stopping = True
        self._wake.set()
        await self.send_once(leaving=True)
        await self._channel.close(None)
