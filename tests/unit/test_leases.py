"""Direct leases at the queen, with its I/O edges faked and a fake clock: a lease is answered
from the queen's own state; the worker's one lease stream carries the notices (held, given
back) and the reports (started, ended); unused leases expire on the queen's clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from apiary.leasetoken import lease_key, verify
from protos.v1 import worker_pb2
from queen.cluster import Cluster
from queen.leases.manager import EXPIRY_GRACE, NOTICE_BATCH, RELINK_DELAY
from queen.routing.ask import Ask, Slot
from tests.fakes import FakeClock, settle
from tests.queen_fakes import FakeChannels, FakeLeaseCall, beat, make_cluster, record, rpc_error

IN_USE, DONE = worker_pb2.LEASE_STATE_IN_USE, worker_pb2.LEASE_STATE_DONE


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def cluster(clock: FakeClock, tmp_path: Path) -> AsyncIterator[Cluster]:
    channels = FakeChannels({"h1:wa": [], "h1:wb": []})
    cluster = make_cluster(clock, tmp_path, channels=channels, interval=3600)
    cluster.apply_heartbeat(beat("h1", record("a"), record("b")))
    yield cluster
    await cluster.leases.close()


def take(cluster: Cluster, worker: str = "a") -> Slot:
    slot = cluster.router.take(Ask("m", exclude=frozenset({"h1:wb" if worker == "a" else "h1:wa"})))
    assert slot is not None and slot.worker_id == worker
    return slot


def lease_stream(cluster: Cluster, address: str = "h1:wa", n: int = -1) -> FakeLeaseCall:
    channels = cluster.channels
    assert isinstance(channels, FakeChannels)
    return channels.stubs[address].lease_calls[n]


def in_flight(cluster: Cluster, worker: str = "a") -> int:
    return cluster.registry.workers[worker].in_flight


async def test_a_lease_is_a_token_for_its_worker_and_the_worker_hears_of_it(
    cluster: Cluster, clock: FakeClock
) -> None:
    ended: list[str] = []
    granted_at = clock.time()
    lease = cluster.leases.grant(take(cluster), 30, on_end=lambda: ended.append("x"), owner="c")
    checked = verify(lease_key("", "a"), lease.token)  # no tokens: the key is public
    assert checked is not None and checked.lease_id == lease.id
    assert checked.expires_at == pytest.approx(clock.time() + 30, abs=0.001)
    assert verify(lease_key("", "b"), lease.token) is None
    assert in_flight(cluster) == 1
    await clock.run(NOTICE_BATCH)
    (notice,) = lease_stream(cluster).notices
    # The first notice goes at once: it carries the queen's clock.
    assert list(notice.held) == [lease.token] and notice.queen_time == granted_at
    # Given back by someone else: it does not exist for them. By its owner: free at once.
    assert not cluster.leases.release(lease.token, by="other")
    assert cluster.leases.release(lease.token, by="c")
    assert in_flight(cluster) == 0 and ended == ["x"]
    assert not cluster.leases.release(lease.token, by="c")
    await clock.run(NOTICE_BATCH)
    assert list(lease_stream(cluster).notices[-1].revoked) == [lease.token]
    assert len(cluster.channels.stubs["h1:wa"].lease_calls) == 1  # type: ignore[attr-defined]


async def test_a_lease_given_back_before_its_notice_is_only_revoked(
    cluster: Cluster, clock: FakeClock
) -> None:
    lease = cluster.leases.grant(take(cluster), 30)
    assert cluster.leases.release(lease.id)  # its id does, as well as its token
    await clock.run(NOTICE_BATCH)
    (notice,) = lease_stream(cluster).notices
    assert (list(notice.held), list(notice.revoked)) == ([], [lease.token])


async def test_the_slot_is_reserved_until_the_call_ends(cluster: Cluster, clock: FakeClock) -> None:
    ended: list[str] = []
    lease = cluster.leases.grant(take(cluster), 1, on_end=lambda: ended.append("x"))
    await clock.run(NOTICE_BATCH)
    stream = lease_stream(cluster)
    stream.report(worker_pb2.LeaseEvent(lease_id=lease.id, state=IN_USE))
    await settle()
    await clock.run(5)  # in use: its TTL no longer counts
    assert in_flight(cluster) == 1 and not ended
    # Reports about leases that are not this worker's, or not out, change nothing.
    b_lease = cluster.leases.grant(take(cluster, "b"), 30)
    stream.report(
        worker_pb2.LeaseEvent(lease_id=b_lease.id, state=DONE, ok=True),
        worker_pb2.LeaseEvent(lease_id="l-unknown", state=DONE, ok=True),
    )
    await settle()
    assert in_flight(cluster, "b") == 1
    stream.report(
        worker_pb2.LeaseEvent(lease_id=lease.id, state=DONE, ok=True, completion_tokens=7)
    )
    await settle()
    assert in_flight(cluster) == 0 and ended == ["x"]
    stats = cluster.registry.workers["a"].stats
    assert stats.completed == 1


async def test_an_unused_lease_expires_on_the_queens_clock(
    cluster: Cluster, clock: FakeClock
) -> None:
    ended: list[str] = []
    cluster.leases.grant(take(cluster), 2, on_end=lambda: ended.append("x"))
    await clock.run(2)
    assert in_flight(cluster) == 1  # the grace covers a call accepted just in time
    await clock.run(EXPIRY_GRACE)
    assert in_flight(cluster) == 0 and ended == ["x"] and not cluster.leases.active


async def test_a_lost_lease_stream_ends_calls_in_use_and_is_opened_again(
    cluster: Cluster, clock: FakeClock
) -> None:
    used = cluster.leases.grant(take(cluster), 30)
    await clock.run(NOTICE_BATCH)
    first = lease_stream(cluster)
    first.report(worker_pb2.LeaseEvent(lease_id=used.id, state=IN_USE))
    await settle()
    two = record("a")
    two.slots_total = 2
    cluster.apply_heartbeat(beat("h1", two, record("b")))
    waiting = cluster.leases.grant(take(cluster), 30)
    first.end(rpc_error(grpc.StatusCode.UNAVAILABLE, "worker gone"))
    await settle()
    assert first.cancelled and in_flight(cluster) == 1  # the call in use is over: it failed
    assert cluster.registry.workers["a"].stats.failed == 1
    assert set(cluster.leases.active) == {waiting.id}
    await clock.run(RELINK_DELAY + NOTICE_BATCH)
    again = lease_stream(cluster)
    assert again is not first
    assert list(again.notices[0].held) == [waiting.token]  # announced again
