"""One request's way with scripted workers: failover, backoff on the cluster's clock, relay."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from apiary.errors import StatusError
from protos.v1 import common_pb2
from queen.cluster import Cluster
from queen.requests.record import Caller
from queen.requests.route import Route
from tests.fakes import FakeClock, settle
from tests.queen_fakes import (
    FakeChannels,
    FakeContext,
    Script,
    beat,
    chunk,
    make_cluster,
    record,
    rpc_error,
)

UNAVAILABLE = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")


def setup(
    tmp: Path, scripts: dict[str, list[Script]], workers: tuple[str, ...] = ("a", "b")
) -> tuple[Cluster, FakeClock]:
    clock = FakeClock()
    cluster = make_cluster(clock, tmp, channels=FakeChannels(scripts))
    cluster.apply_heartbeat(beat("h1", *(record(w) for w in workers)))
    return cluster, clock


def route(cluster: Cluster, remaining: float | None = 30.0) -> Route:
    request = common_pb2.InferRequest(
        model="m",
        prompt="p",
        max_tokens=5,
        request_id="r1",
        policy=common_pb2.ROUTING_POLICY_LRU,  # a (joined first), then b
    )
    return Route(cluster, request, FakeContext(remaining), Caller())


async def drain(r: Route, into: list[common_pb2.InferChunk]) -> None:
    async for piece in r.run():
        into.append(piece)


def failovers(cluster: Cluster) -> float | None:
    return cluster.metrics.prometheus.get_sample_value("apiary_failovers_total", {"model": "m"})


async def test_unavailable_worker_is_left_for_another_after_a_backoff_on_the_clock(
    tmp_path: Path,
) -> None:
    cluster, clock = setup(
        tmp_path,
        {
            "h1:wa": [[UNAVAILABLE]],
            "h1:wb": [[chunk("x"), chunk("y", completion_tokens=2)]],
        },
    )
    r = route(cluster)
    chunks: list[common_pb2.InferChunk] = []
    relay = asyncio.create_task(drain(r, chunks))
    await settle()
    # Backing off before the second attempt, on the cluster's clock only.
    assert clock.sleeping == 1 and r.record.attempts == 1 and chunks == []
    assert cluster.registry.workers["a"].unreachable
    assert cluster.registry.workers["a"].in_flight == 0  # its slot went back at once
    assert failovers(cluster) == 1
    clock.advance(0.09)
    await settle()
    assert clock.sleeping == 1 and r.record.attempts == 1
    await clock.run(0.02)
    await relay
    assert [c.text for c in chunks] == ["x", "y"]
    assert chunks[0].worker_id == "b" and r.record.attempts == 2 and r.record.counts.tokens == 2
    assert cluster.registry.workers["b"].in_flight == 0
    assert cluster.registry.workers["b"].stats.completed == 1


async def test_a_full_worker_is_tried_again_after_the_backoff(tmp_path: Path) -> None:
    full = rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "all slots in use")
    cluster, clock = setup(tmp_path, {"h1:wa": [[full], [chunk("ok")]]}, workers=("a",))
    r = route(cluster)
    chunks: list[common_pb2.InferChunk] = []
    relay = asyncio.create_task(drain(r, chunks))
    await settle()
    assert clock.sleeping == 1 and not cluster.registry.workers["a"].unreachable
    await clock.run(0.1)
    await relay
    assert [c.text for c in chunks] == ["ok"] and r.record.attempts == 2
    assert cluster.registry.workers["a"].stats.failed == 0  # not counted as a failure


async def test_when_every_worker_was_tried_the_request_stops_early(tmp_path: Path) -> None:
    cluster, clock = setup(tmp_path, {"h1:wa": [[UNAVAILABLE]]}, workers=("a",))
    r = route(cluster)
    relay = asyncio.create_task(drain(r, []))
    await settle()
    await clock.run(0.1)
    with pytest.raises(StatusError) as failed:
        await relay
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(failed.value) == (
        "no worker of model 'm' could serve the request after 1 attempt(s); "
        "last error: worker a: UNAVAILABLE: connection refused"
    )


async def test_a_failure_after_chunks_is_reported_not_retried(tmp_path: Path) -> None:
    cluster, clock = setup(tmp_path, {"h1:wa": [[chunk("x"), UNAVAILABLE]]})
    chunks: list[common_pb2.InferChunk] = []
    with pytest.raises(StatusError) as failed:
        await drain(route(cluster), chunks)
    assert [c.text for c in chunks] == ["x"] and clock.sleeping == 0
    assert "failed after 1 token chunk(s) were delivered" in str(failed.value)
    assert not cluster.registry.workers["a"].unreachable
    assert cluster.registry.workers["a"].stats.failed == 1


async def test_no_retry_when_the_deadline_is_closer_than_the_backoff(tmp_path: Path) -> None:
    cluster, clock = setup(tmp_path, {"h1:wa": [[UNAVAILABLE]]})
    with pytest.raises(StatusError) as failed:
        await drain(route(cluster, remaining=0.05), [])
    assert clock.sleeping == 0
    assert "after 1 attempt(s)" in str(failed.value)
