"""Failover under load: SIGKILL one of 4 workers while 32 clients stream through the queen.

Counts every request the queen accepted and how it ended. A request whose first
chunk had not been sent when its worker died must be retried on another worker
and complete (target: 0 of those fail); one already streaming ends with
UNAVAILABLE saying how much was delivered (never a silent duplicate). Echo
workers (benchmarks only) with a per-token delay, so streams are in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apiary.protoutil import READY_STATES
from bench.load import Tally, client
from harness import Cluster, wait_until
from protos.v1 import queen_pb2


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--kill-at", type=float, default=3.0)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--token-delay", type=float, default=0.01)
    p.add_argument("--max-requests", type=int, default=20_000)
    args = p.parse_args()
    cluster = Cluster(heartbeat_interval=1.0)
    try:
        queen = cluster.start_queen()
        cluster.start_hive(
            queen, "bench",
            f"model=bench,count=4,slots=8,restart=never,token_delay={args.token_delay}",
            extra=("--health-interval", "5", "--health-timeout", "2"),
        )  # fmt: skip
        workers = await cluster.wait_workers(queen, "bench", 4)
        stub = cluster.queen_stub(queen)
        admin = cluster.admin_stub(queen)
        tally = Tally()
        stop_at = time.monotonic() + args.seconds
        load = [
            asyncio.create_task(
                client(stub, tally, "bench", args.tokens, stop_at, args.max_requests)
            )
            for _ in range(args.clients)
        ]
        await asyncio.sleep(args.kill_at)  # steady load until the kill: the experiment's clock
        victim = workers[0]
        before = (tally.accepted, tally.completed)
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.perf_counter()
        request = queen_pb2.GetWorkerRequest(worker_id=victim.id)

        async def routed_around() -> bool:
            return (await admin.GetWorker(request)).worker.state not in READY_STATES

        await wait_until(routed_around, 30, interval=0.001)
        took = time.perf_counter() - killed
        await asyncio.gather(*load)
        history = (await admin.ListRequests(queen_pb2.ListRequestsRequest(limit=10_000))).requests
        retried = sum(
            1 for r in history if r.attempts > 1 and r.status == queen_pb2.REQUEST_STATUS_COMPLETED
        )

        print(f"# bench/failover.py: {args.clients} clients x {args.seconds:g}s, 4 echo workers "
              f"(8 slots, {args.tokens} tokens x {args.token_delay * 1000:g} ms), SIGKILL of "
              f"{victim.id} at {args.kill_at:g}s")  # fmt: skip
        print(f"accepted                      {tally.accepted}")
        print(f"completed                     {tally.completed}")
        print(f"failed before first chunk     {tally.failed_before_first}   (target 0)")
        print(
            f"failed after first chunk      {tally.failed_after_first}   (streaming on the victim)"
        )
        print(f"completed after a retry       {retried}")
        print(f"accepted/completed at kill    {before[0]}/{before[1]}")
        print(f"kill -> not routed            {took * 1000:.1f} ms")
        for error, count in sorted(tally.errors.items()):
            print(f"  {count:>4} x {error}")
        print(f"unaccounted                   {tally.accepted - tally.ended}")
        verdict = "met" if tally.failed_before_first == 0 else "MISSED"
        print(f"target: 0 failed before first chunk: {verdict}")
    finally:
        await cluster.close()


if __name__ == "__main__":
    asyncio.run(main())
