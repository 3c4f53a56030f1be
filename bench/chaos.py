"""Chaos under load: 32 streaming clients while a worker, then a whole hive, then the queen die.

The worker and the hive (its process and its workers: a machine lost) are SIGKILLed;
the queen is SIGKILLed and started again by this script on the same port and state
dir. Every request is counted by how it ended. Target: nothing fails before its first
token, except requests in flight on the queen when it died (clients see UNAVAILABLE
and retry). Bounded in time (--seconds) and count (--max-requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apiary.protoutil import READY_STATES
from apiary.serving import CHANNEL_OPTIONS
from bench.load import Tally, client
from harness import Cluster, NotMet, wait_until
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc


async def run(seconds: float, clients: int, cap: int, tokens: int) -> dict[str, Any]:
    cluster = Cluster(heartbeat_interval=0.5)
    try:
        queen = cluster.start_queen()
        spawn = "model=chaos,count=2,slots=8,token_delay=0.02"
        hives = [
            cluster.start_hive(queen, f"h{i}", spawn, extra=("--restart-backoff", "0.2"))
            for i in (1, 2)
        ]
        workers = await cluster.wait_workers(queen, "chaos", 4)
        channel = grpc.aio.insecure_channel(queen.address, options=list(CHANNEL_OPTIONS))
        stub = queen_pb2_grpc.QueenStub(channel)
        admin = cluster.admin_stub(queen)
        tally = Tally()
        stop_at = time.monotonic() + seconds
        load = [
            asyncio.create_task(client(stub, tally, "chaos", tokens, stop_at, cap))
            for _ in range(clients)
        ]
        faults: dict[str, float] = {}

        async def until(check: Any, limit: float = 20) -> float:
            """Seconds until `check` held; infinity if it did not within `limit`."""
            start = time.monotonic()
            try:
                await wait_until(check, limit, interval=0.01)
            except NotMet:
                return float("inf")
            return time.monotonic() - start

        await asyncio.sleep(seconds * 0.15)  # a phase of steady load before the fault
        # 1. A worker.
        victim = workers[0]
        os.kill(victim.pid, signal.SIGKILL)

        async def worker_out() -> bool:
            got = await admin.GetWorker(queen_pb2.GetWorkerRequest(worker_id=victim.id), timeout=1)
            return got.worker.state not in READY_STATES

        faults["worker SIGKILL -> not routed"] = await until(worker_out)

        await asyncio.sleep(seconds * 0.15)  # a phase of steady load before the fault
        # 2. A whole hive: the hive and its workers, like a machine that lost power.
        lost = hives[1]
        procs = [psutil.Process(lost.pid), *psutil.Process(lost.pid).children()]
        for proc in procs:
            proc.kill()

        async def hive_out() -> bool:
            hive = (await admin.GetHive(queen_pb2.GetHiveRequest(hive_id="h2"), timeout=1)).hive
            return hive.health == common_pb2.HIVE_HEALTH_UNHEALTHY

        faults["hive SIGKILL -> not routed"] = await until(hive_out)

        await asyncio.sleep(seconds * 0.15)  # a phase of steady load before the fault
        # 3. The queen, started again by us on the same port and state dir.
        port = queen.port
        tally.queen_down = True
        queen.signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(queen.wait, 5)
        queen = cluster.start_queen(port)
        admin = cluster.admin_stub(queen)

        async def routing_again() -> bool:
            request = common_pb2.InferRequest(model="chaos", prompt="probe", max_tokens=1)
            return bool([c async for c in stub.Infer(request, timeout=2)])

        await until(routing_again)
        tally.queen_down = False
        faults["queen SIGKILL -> routing again"] = time.monotonic() - killed
        await asyncio.gather(*load)
        await channel.close(None)
        return {
            "clients": clients,
            "seconds": seconds,
            "accepted": tally.accepted,
            "completed": tally.completed,
            "failed_before_first_token": tally.failed_before_first,
            "failed_after_first_token": tally.failed_after_first,
            "lost_with_the_queen": tally.lost_with_queen,
            "faults_routed_around_seconds": faults,
            "errors": tally.errors,
        }
    finally:
        await cluster.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=50_000)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = await run(args.seconds, args.clients, args.max_requests, args.tokens)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"# bench/chaos.py: {args.clients} clients for {args.seconds:g}s; SIGKILL a worker, then a "
        "hive with its workers, then the queen (restarted)"
    )
    for key in (
        "accepted",
        "completed",
        "failed_before_first_token",
        "failed_after_first_token",
        "lost_with_the_queen",
    ):
        print(f"{key:<28}{result[key]}")
    for fault, took in result["faults_routed_around_seconds"].items():
        print(f"{fault:<34}{took * 1000:8.1f} ms")
    for error, count in sorted(result["errors"].items()):
        print(f"  {count:>5} x {error}")
    verdict = "met" if result["failed_before_first_token"] == 0 else "MISSED"
    print(f"target: 0 failed before first token (queen crash aside): {verdict}")


if __name__ == "__main__":
    asyncio.run(main())
