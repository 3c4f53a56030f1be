"""A stopping queen and the longest wait for a slot, with the queen's I/O edges faked: new
requests refused, waits ended, a stream cut when the grace runs out and recorded so (however
its call ends), and --max-wait for a request without a deadline (an Infer or a Lease)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from protos.v1 import common_pb2, queen_pb2
from queen import stopping
from queen.cluster import Cluster
from queen.requests.in_flight import InFlight
from queen.routing.ask import Ask, Slot
from queen.routing.desk import DEFAULT_MAX_WAIT, slot_wait
from queen.rpc.queen import QueenService
from tests.fakes import FakeClock, settle
from tests.queen_fakes import FakeCall, FakeChannels, beat, chunk, make_cluster, record
from tests.unit.test_request_records import TOKENS, Aborted, Context, Rows

FAILED, DEADLINE = queen_pb2.REQUEST_STATUS_FAILED, queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED


class HangingCall(FakeCall):
    """A worker stream that sends its chunks, then waits for more until it is cancelled; a
    read it wakes that way raises CancelledError, as grpc.aio's does."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__([chunk(t) for t in texts])
        self.hang: asyncio.Future[None] | None = None

    async def read(self) -> object:
        if self.script:
            return await super().read()
        if self.cancelled:
            raise asyncio.CancelledError()
        self.hang = asyncio.get_running_loop().create_future()
        await self.hang
        raise AssertionError("a hanging call never ends by itself")

    def done(self) -> bool:
        return self.cancelled

    def cancel(self) -> bool:
        self.cancelled = True
        if self.hang is not None:
            self.hang.cancel()
        return True


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    cluster = make_cluster(FakeClock(), tmp_path, channels=FakeChannels({"h1:wa": []}))
    cluster.history = Rows()
    cluster.apply_heartbeat(beat("h1", record("a")))
    return cluster


def rows(cluster: Cluster) -> Rows:
    return cast(Rows, cluster.history)


def service_of(cluster: Cluster, max_wait: float = DEFAULT_MAX_WAIT) -> QueenService:
    return QueenService(cluster, TOKENS, max_wait=max_wait)


def infer(service: QueenService, context: Context, **kw: Any) -> AsyncGenerator[Any, None]:
    request = common_pb2.InferRequest(model="m", prompt="p", max_tokens=5, **kw)
    return cast("AsyncGenerator[Any, None]", service.Infer(request, context))  # type: ignore[arg-type]


async def drain(stream: AsyncGenerator[Any, None]) -> list[Any]:
    return [piece async for piece in stream]


def held_slot(cluster: Cluster) -> Slot:
    """The only worker's only slot, taken: every request now waits."""
    slot = cluster.desk.try_take(Ask("m"))
    assert slot is not None
    return slot


def test_a_wait_lasts_until_the_deadline_but_never_beyond_max_wait() -> None:
    assert slot_wait(None, 300) == (300, True)  # no deadline (grpcurl's default)
    assert slot_wait(10, 300) == (10, False)
    assert slot_wait(500, 300) == (300, True)
    assert slot_wait(-1, 300) == (0, False)


async def test_a_request_without_a_deadline_waits_at_most_max_wait(cluster: Cluster) -> None:
    service = service_of(cluster, max_wait=0.05)
    held_slot(cluster)
    with pytest.raises(Aborted) as waited:
        await drain(infer(service, Context("t-shop", remaining=None), request_id="r"))
    assert waited.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and not waited.value.stopping
    assert waited.value.details == (
        "no free worker of model 'm' within the queen's --max-wait of 0.05 s; "
        "0 other request(s) waiting; retry later"
    )
    row = rows(cluster).only()
    assert (row["status"], row["error"]) == (DEADLINE, f"DEADLINE_EXCEEDED: {waited.value.details}")
    assert service.quotas.queued.held("shop") == 0 and cluster.desk.queued == 0
    # A lease waits no longer.
    lease = queen_pb2.LeaseRequest(model="m")
    with pytest.raises(Aborted) as leased:
        await service.Lease(lease, Context("t-shop", remaining=None))  # type: ignore[arg-type]
    assert leased.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--max-wait of 0.05 s" in leased.value.details
    assert service.quotas.leases.held("shop") == 0


async def test_a_deadline_shorter_than_max_wait_is_the_clients_own(cluster: Cluster) -> None:
    service = service_of(cluster, max_wait=30)
    held_slot(cluster)
    with pytest.raises(Aborted) as waited:
        await drain(infer(service, Context("t-shop", remaining=0.05)))
    assert waited.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert waited.value.details.startswith("no free worker of model 'm' before the deadline")


async def test_a_stopping_queen_refuses_new_requests_and_ends_waiting_ones(
    cluster: Cluster,
) -> None:
    service = service_of(cluster)
    held_slot(cluster)
    waiting = asyncio.create_task(drain(infer(service, Context("t-shop"), request_id="w")))
    lease = queen_pb2.LeaseRequest(model="m")
    leasing = asyncio.create_task(service.Lease(lease, Context("t-search")))  # type: ignore[arg-type]
    await settle()
    assert cluster.desk.queued == 2
    assert service.routing_problem() is None and service.model_ready("m")
    service.stop()
    assert service.routing_problem() == "draining: the queen is shutting down"
    assert not service.model_ready("m")
    for task in (waiting, leasing):
        with pytest.raises(Aborted) as ended:
            await task
        assert ended.value.code == grpc.StatusCode.UNAVAILABLE and ended.value.stopping
        assert ended.value.details == stopping.ended_while_waiting()
    assert ended.value.details.startswith("queen shutting down: the request was still waiting")
    row = rows(cluster).only()
    assert (row["status"], row["error"]) == (FAILED, f"UNAVAILABLE: {ended.value.details}")
    assert cluster.desk.queued == 0 and service.quotas.queued.held("shop") == 0
    assert service.quotas.leases.held("search") == 0 and not service.in_flight
    # New calls are refused before anything is recorded.
    for call in (drain(infer(service, Context("t-shop"))), service.Lease(lease, Context("t-shop"))):  # type: ignore[arg-type]
        with pytest.raises(Aborted) as refused:
            await call
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE and refused.value.stopping
        assert refused.value.details == (
            "queen shutting down: it takes no new requests; retry against another queen, or "
            "once this one has restarted"
        )
    assert len(rows(cluster).rows) == 1


def worker_call(cluster: Cluster, call: FakeCall) -> None:
    cast(FakeChannels, cluster.channels).stubs["h1:wa"].calls.append(call)


async def test_a_stream_running_when_the_grace_runs_out_is_cut_and_recorded_so(
    cluster: Cluster,
) -> None:
    service = service_of(cluster)
    call = HangingCall(["a", "b"])
    worker_call(cluster, call)
    stream = infer(service, Context("t-shop"), request_id="long")
    assert [(await anext(stream)).text for _ in range(2)] == ["a", "b"]
    reading = asyncio.create_task(anext(stream))  # waits for the worker's next chunk
    await settle()
    assert not await service.in_flight.finished(0.01)
    assert service.in_flight.cut(5.0) == 1
    with pytest.raises(Aborted) as cut:
        await reading
    assert cut.value.code == grpc.StatusCode.UNAVAILABLE and cut.value.stopping
    assert cut.value.details == (
        "queen shutting down: the stream was ended after 2 token chunk(s) were delivered, when "
        "the queen's --shutdown-grace of 5 s ran out; retry against another queen, or once "
        "this one has restarted"
    )
    row = rows(cluster).only()
    assert (row["status"], row["error"], row["tokens"]) == (
        FAILED,
        f"UNAVAILABLE: {cut.value.details}",
        2,
    )
    assert call.cancelled and cluster.registry.workers["a"].in_flight == 0
    assert cluster.registry.workers["a"].stats.failed == 0  # not the worker's fault
    await stream.aclose()
    assert await service.in_flight.finished(0.01)


async def test_a_stream_cut_while_sending_to_its_client_is_recorded_as_cut(
    cluster: Cluster,
) -> None:
    """Its handler waits at a yield, so only the server's stop ends the call (GeneratorExit):
    the record still says the shutdown ended it, not the client."""
    service = service_of(cluster)
    worker_call(cluster, HangingCall(["a", "b"]))
    stream = infer(service, Context("t-shop"))
    await anext(stream)  # suspended at its yield: grpc.aio is sending
    service.in_flight.cut(1.0)
    await stream.aclose()
    row = rows(cluster).only()
    assert row["status"] == FAILED
    assert row["error"].startswith("UNAVAILABLE: queen shutting down: the stream was ended after")
    assert await service.in_flight.finished(0.01)


async def test_a_client_that_leaves_is_still_cancelled_not_cut(cluster: Cluster) -> None:
    service = service_of(cluster)
    worker_call(cluster, HangingCall(["a"]))
    stream = infer(service, Context("t-shop"))
    await anext(stream)
    reading = asyncio.create_task(anext(stream))
    await settle()
    reading.cancel()  # grpc.aio cancels the handler when the client goes
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert rows(cluster).only()["status"] == queen_pb2.REQUEST_STATUS_CANCELLED


async def test_in_flight_is_done_at_once_when_empty_and_when_hurried() -> None:
    in_flight = InFlight()
    assert await in_flight.finished(10)
    in_flight.add(cast(Any, "a route"))
    hurry = asyncio.Event()
    hurried = asyncio.create_task(in_flight.finished(10, hurry))
    await settle()
    assert not hurried.done()
    hurry.set()
    assert not await asyncio.wait_for(hurried, 1)
    in_flight.discard(cast(Any, "a route"))
    assert await in_flight.finished(10)
