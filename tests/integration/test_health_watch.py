"""grpc.health.v1 Health/Watch on every server: SERVING, then NOT_SERVING as it shuts down.

gRPC's client-side health checking (grpc-go, grpc-java, Envoy) uses Watch, not Check.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import Cluster
from harness import wait_until as eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def statuses(call: Any, into: list[int]) -> None:
    """Every status a Watch stream reports, until the server ends it."""
    try:
        async for reply in call:
            into.append(reply.status)
    except grpc.aio.AioRpcError:
        pass  # the server went away after saying NOT_SERVING


async def test_watch_reports_serving_then_not_serving_on_shutdown(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", "model=demo")
    (worker,) = await cluster.wait_workers(queen, "demo", 1)
    seen: dict[str, list[int]] = {"queen": [], "hive": [], "worker": []}
    watches = []
    for name, address in (
        ("queen", queen.address),
        ("hive", hive.address),
        ("worker", worker.address),
    ):
        stub = health_pb2_grpc.HealthStub(cluster.channel(address))
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        watches.append(asyncio.create_task(statuses(call, seen[name])))

    async def first_reports() -> bool:
        return all(s[:1] == [SERVING] for s in seen.values())

    await eventually(first_reports)
    hive.signal(signal.SIGTERM)  # stops its worker too
    await eventually(lambda: _said_not_serving(seen, "hive", "worker"))
    queen.signal(signal.SIGTERM)
    await eventually(lambda: _said_not_serving(seen, "queen"))
    await asyncio.wait_for(asyncio.gather(*watches), 30)


async def _said_not_serving(seen: dict[str, list[int]], *names: str) -> bool:
    return all(NOT_SERVING in seen[name] for name in names)
