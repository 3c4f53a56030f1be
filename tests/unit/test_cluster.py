"""The queen's shared state: follow-ups of worker-table changes, the event hook, and the sweep
loop driven by a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from apiary.errors import StatusError
from protos.v1 import common_pb2, queen_pb2
from queen.cluster import Cluster
from queen.routing.ask import Ask, Outcome
from tests.fakes import FakeClock, settle
from tests.queen_fakes import FakeChannels, beat, make_cluster, record


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cluster(clock: FakeClock, tmp_path: Path) -> Cluster:
    return make_cluster(clock, tmp_path, interval=1.0, hive_ttl_intervals=10.0)


def discarded(cluster: Cluster) -> list[str]:
    assert isinstance(cluster.channels, FakeChannels)
    return cluster.channels.discarded


def health_changes(cluster: Cluster, events: list[queen_pb2.Event]) -> list[int]:
    return [e.health for e in events if e.kind == queen_pb2.EVENT_KIND_HIVE_HEALTH_CHANGED]


async def test_sweep_marks_a_silent_hive_unhealthy_then_removes_it_after_the_ttl(
    cluster: Cluster, clock: FakeClock
) -> None:
    watcher = cluster.events.subscribe()
    lost: list[str] = []
    cluster.hive_watch.watch("h1", lambda: lost.append("h1"))
    cluster.apply_heartbeat(beat("h1", record("a")))
    assert cluster.desk.try_take(Ask("m")) is not None
    waiting = asyncio.create_task(cluster.desk.take("client", Ask("m"), None))
    sweeper = asyncio.create_task(cluster.sweep_forever())
    try:
        await clock.run(2.9)  # degraded after 2 intervals, noticed by the sweep at 2.0
        assert health_changes(cluster, list(watcher.pending)) == [common_pb2.HIVE_HEALTH_DEGRADED]
        assert lost == []
        await clock.run(0.1)  # unhealthy after 3: requests on its workers hear it at once
        assert health_changes(cluster, list(watcher.pending))[-1] == (
            common_pb2.HIVE_HEALTH_UNHEALTHY
        )
        assert lost == ["h1"]
        await clock.run(6.9)
        assert "h1" in cluster.registry.hives and not waiting.done()
        await clock.run(0.1)  # the TTL: forgotten, its channels closed, its waiters told
        assert cluster.registry.hives == {} and discarded(cluster) == ["h1:wa"]
        with pytest.raises(StatusError) as gone:
            await waiting
        assert gone.value.code == grpc.StatusCode.NOT_FOUND  # the model is unknown now
        assert watcher.pending[-1].kind == queen_pb2.EVENT_KIND_HIVE_REMOVED
    finally:
        sweeper.cancel()


async def test_the_sweep_sleeps_on_the_clusters_clock_every_half_interval(
    cluster: Cluster, clock: FakeClock
) -> None:
    sweeps: list[float] = []

    def sweep() -> list[str]:
        sweeps.append(clock.now)
        return []

    cluster.registry.sweep = sweep  # type: ignore[method-assign]
    sweeper = asyncio.create_task(cluster.sweep_forever())
    try:
        await settle()
        assert clock.sleeping == 1 and sweeps == []
        await clock.run(1.6)
        assert sweeps == [1000.5, 1001.0, 1001.5]
    finally:
        sweeper.cancel()


async def test_a_failing_sweep_step_is_logged_and_the_loop_goes_on(
    cluster: Cluster, clock: FakeClock
) -> None:
    calls: list[float] = []

    def sweep() -> list[str]:
        calls.append(clock.now)
        if len(calls) == 1:
            raise RuntimeError("bad step")
        return []

    cluster.registry.sweep = sweep  # type: ignore[method-assign]
    sweeper = asyncio.create_task(cluster.sweep_forever())
    try:
        with capture_logs() as logs:
            await clock.run(1.0)
        assert len(calls) == 2
        assert [entry["event"] for entry in logs] == ["sweep step failed"]
    finally:
        sweeper.cancel()


async def test_heartbeat_closes_channels_of_workers_gone_and_serves_waiters(
    cluster: Cluster,
) -> None:
    cluster.apply_heartbeat(beat("h1", record("a")))
    slot = cluster.desk.try_take(Ask("m"))
    assert slot is not None
    waiting = asyncio.create_task(cluster.desk.take("client", Ask("m"), None))
    await settle()
    cluster.apply_heartbeat(beat("h1", record("b")))
    assert discarded(cluster) == ["h1:wa"]
    assert (await waiting).worker_id == "b"
    cluster.desk.give_back(slot, Outcome(ok=True))  # a worker since gone: dropped


async def test_a_spawn_reply_replacing_a_worker_closes_its_old_channel(
    cluster: Cluster,
) -> None:
    cluster.apply_heartbeat(beat("h1", record("a")))
    assert cluster.desk.try_take(Ask("m")) is not None
    waiting = asyncio.create_task(cluster.desk.take("client", Ask("m"), None))
    await settle()
    restarted = record("a")
    restarted.address = "h1:wa2"  # a new process behind the same id
    cluster.apply_worker(restarted)
    assert discarded(cluster) == ["h1:wa"]
    assert (await waiting).address == "h1:wa2"


async def test_autospawned_worker_is_applied_and_announced(cluster: Cluster) -> None:
    watcher = cluster.events.subscribe([queen_pb2.EVENT_KIND_AUTOSPAWN])
    cluster.apply_heartbeat(beat("h1"))
    waiting = asyncio.create_task(cluster.desk.take("client", Ask("m"), None))
    await settle()
    cluster.autospawn.on_spawned(record("a"))  # as the autospawner calls it
    assert (await waiting).worker_id == "a"
    assert [(e.worker_id, e.model) for e in watcher.pending] == [("a", "m")]


async def test_events_are_published_and_the_operators_ones_logged(cluster: Cluster) -> None:
    watcher = cluster.events.subscribe()
    with capture_logs() as logs:
        cluster.apply_heartbeat(beat("h1", record("a")))
    assert [e.kind for e in watcher.pending] == [
        queen_pb2.EVENT_KIND_HIVE_JOINED,
        queen_pb2.EVENT_KIND_WORKER_JOINED,
    ]
    assert [(entry["event"], entry["hive_id"]) for entry in logs] == [("hive joined", "h1")]
