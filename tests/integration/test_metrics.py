"""Prometheus metrics from a real queen and hive, scraped over HTTP."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from harness import Cluster, wait_until
from protos.v1 import common_pb2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_queen_and_hive_metrics(cluster: Cluster) -> None:
    queen_port, hive_port = free_port(), free_port()
    queen = cluster.start_queen(0, "--metrics-port", str(queen_port))
    cluster.start_hive(
        queen, "h1", "model=demo,count=2,token_delay=0.01", extra=("--metrics-port", str(hive_port))
    )
    await cluster.wait_workers(queen, "demo", 2)
    stub = cluster.queen_stub(queen)

    async def one(i: int) -> list[Any]:
        request = common_pb2.InferRequest(model="demo", prompt="a b", max_tokens=5)
        return [c async for c in stub.Infer(request, timeout=20)]

    await asyncio.gather(*(one(i) for i in range(6)))
    q = await asyncio.to_thread(scrape, queen_port)
    assert q[("apiary_requests_total", (("model", "demo"), ("status", "completed")))] == 6
    assert q[("apiary_completion_tokens_total", (("model", "demo"),))] == 30
    assert q[("apiary_time_to_first_token_seconds_count", (("model", "demo"),))] == 6
    assert q[("apiary_request_duration_seconds_count", (("model", "demo"),))] == 6
    assert q[("apiary_request_tokens_per_second_count", (("model", "demo"),))] == 6
    assert q[("apiary_workers", (("model", "demo"), ("state", "IDLE")))] == 2
    assert q[("apiary_queue_depth", (("model", "demo"),))] == 0
    assert q[("apiary_hives", (("health", "HEALTHY"),))] == 1
    assert q[("apiary_heartbeats_total", ())] >= 1
    assert q.get(("apiary_failovers_total", (("model", "demo"),)), 0) == 0

    async def hive_metrics() -> dict[Any, float] | None:
        h = await asyncio.to_thread(scrape, hive_port)
        idle = h.get(("apiary_hive_workers", (("model", "demo"), ("state", "IDLE"))))
        return h if idle == 2 else None

    h = await wait_until(hive_metrics)
    assert h[("apiary_hive_spawns_total", ())] == 2
    assert h[("apiary_hive_crashes_total", ())] == 0
    assert h[("apiary_hive_uptime_seconds", ())] > 0
