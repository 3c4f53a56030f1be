"""Crash detection: time from SIGKILL of a worker to the queen no longer routing to it.

Default settings (1 s heartbeats, 5 s health checks): detection rides on the hive
awaiting its child and heartbeating at once, not on either period. Prints the
median of N kills and the ratio to one heartbeat interval (what a purely periodic
report would cost at best on average: half an interval; at worst: a whole one).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apiary.protoutil import READY_STATES
from harness import Cluster, wait_until
from protos.v1 import common_pb2, queen_pb2


async def _hive_known(admin: Any) -> bool:
    return bool((await admin.ListHives(queen_pb2.ListHivesRequest())).hives)


async def _ready(admin: Any, request: queen_pb2.GetWorkerRequest) -> bool:
    return (await admin.GetWorker(request)).worker.state in READY_STATES


async def _not_routable(admin: Any, request: queen_pb2.GetWorkerRequest) -> bool:
    try:
        state = (await admin.GetWorker(request)).worker.state
    except grpc.aio.AioRpcError:
        return True  # gone from the registry: not routable either
    return state not in READY_STATES


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kills", type=int, default=20)
    args = p.parse_args()
    cluster = Cluster(heartbeat_interval=1.0)
    try:
        queen = cluster.start_queen()
        # Default hive settings apart from the state dir the helper gives every hive.
        cluster.start_hive(
            queen, "bench", extra=("--health-interval", "5", "--health-timeout", "2")
        )
        admin = cluster.admin_stub(queen)
        await wait_until(lambda: _hive_known(admin), 30, interval=0.01)
        rtt: list[float] = []
        detect: list[float] = []
        for i in range(args.kills):
            spawned = await admin.SpawnWorker(
                queen_pb2.QueenSpawnWorkerRequest(
                    hive_id="bench",
                    model=f"detect{i}",
                    backend="echo",
                    wait_ready=True,
                    restart_policy=common_pb2.RESTART_POLICY_NEVER,
                ),
                timeout=30,
            )
            worker = spawned.worker
            request = queen_pb2.GetWorkerRequest(worker_id=worker.id)
            await wait_until(functools.partial(_ready, admin, request), 30, interval=0.01)
            t0 = time.perf_counter()
            await admin.GetWorker(request)
            rtt.append(time.perf_counter() - t0)

            os.kill(worker.pid, signal.SIGKILL)
            killed = time.perf_counter()
            # Polled back to back (interval 0): the poll is the measurement's resolution.
            await wait_until(functools.partial(_not_routable, admin, request), 30, interval=0)
            detect.append(time.perf_counter() - killed)
            await admin.RetireWorker(queen_pb2.RetireWorkerRequest(worker_id=worker.id), timeout=30)

        med = statistics.median(detect)
        print(
            f"# bench/detect.py: {args.kills} SIGKILLs, default settings "
            f"(heartbeat 1 s, health check 5 s)"
        )
        print(
            f"detection  median {med * 1000:7.1f} ms   p90 "
            f"{sorted(detect)[int(0.9 * len(detect))] * 1000:7.1f} ms   "
            f"max {max(detect) * 1000:7.1f} ms   min {min(detect) * 1000:7.1f} ms"
        )
        print(
            f"baseline   GetWorker round trip (measurement resolution) median "
            f"{statistics.median(rtt) * 1000:.2f} ms"
        )
        print(f"ratio      median detection / heartbeat interval = {med / 1.0:.3f}")
        print(f"target     median <= 500 ms: {'met' if med <= 0.5 else 'MISSED'}")
    finally:
        await cluster.close()


if __name__ == "__main__":
    asyncio.run(main())
