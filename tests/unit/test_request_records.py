"""The Queen service's Infer with its I/O edges faked: whose request it is, the queen's own
ids beside the client's reference, and one honest record however the call ends (done
callback, GeneratorExit at a yield, CancelledError at an await, a deadline)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from structlog.testing import capture_logs

from apiary.errors import STOPPING_KEY, StatusError
from apiary.security import TokenSet
from protos.v1 import common_pb2, queen_pb2
from queen.cluster import Cluster
from queen.history import History
from queen.quotas import Quotas
from queen.routing.ask import Ask, Outcome
from queen.rpc.queen import QueenService
from tests.fakes import FakeClock, settle
from tests.queen_fakes import FakeCall, FakeChannels, beat, chunk, make_cluster, record


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailers = tuple(trailers)

    @property
    def stopping(self) -> bool:
        """Marked as a stopping queen's answer (the apiary-stopping trailer)."""
        return (STOPPING_KEY, "1") in self.trailers


class Context:
    """The parts of grpc.aio's ServicerContext the Queen service uses."""

    def __init__(
        self, token: str = "", peer: str = "ipv4:10.0.0.7:5555", remaining: float | None = 30
    ) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._peer = peer
        self.remaining = remaining
        self.callbacks: list[Callable[[Any], None]] = []

    def invocation_metadata(self) -> Any:
        return self.metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return self.remaining

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)

    def done(self) -> None:
        """What grpc.aio does when the call ends."""
        for callback in self.callbacks:
            callback(self)

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        raise Aborted(code, details, trailing_metadata)


class Rows(History):
    """The history's writes, kept in memory; a final write is committed at once."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"))
        self.rows: dict[str, dict[str, Any]] = {}
        self.finishes = 0

    def accepted(
        self, request_id: str, model: str, at: float, client: str = "", client_request_id: str = ""
    ) -> None:
        assert request_id not in self.rows
        self.rows[request_id] = {
            "client": client,
            "client_request_id": client_request_id,
            "status": queen_pb2.REQUEST_STATUS_QUEUED,
        }

    def started(
        self, request_id: str, worker_id: str, hive_id: str, at: float, attempt: int,
        policy: int = 0,
    ) -> None:  # fmt: skip
        self.rows[request_id].update(
            status=queen_pb2.REQUEST_STATUS_RUNNING, worker=worker_id, policy=policy
        )

    def finish(
        self,
        request_id: str,
        status: queen_pb2.RequestStatus.ValueType,
        at: float,
        tokens: int,
        error: str,
        attempts: int,
        wait: bool = True,
    ) -> asyncio.Future[None] | None:
        self.finishes += 1
        self.rows[request_id].update(status=status, tokens=tokens, error=error)
        if not wait:
            return None
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def only(self) -> dict[str, Any]:
        (row,) = self.rows.values()
        return row


class GatedCall(FakeCall):
    """A worker stream whose chunks after the first `free` wait for the test to open the gate."""

    def __init__(self, texts: list[str], free: int) -> None:
        super().__init__([chunk(t) for t in texts])
        self.free = free
        self.reads = 0
        self.gate = asyncio.Event()

    async def read(self) -> object:
        self.reads += 1
        if self.reads > self.free:
            await self.gate.wait()
        return await super().read()


TOKENS = TokenSet(clients={"shop": "t-shop", "search": "t-search"}, admin="t-admin")


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    cluster = make_cluster(FakeClock(), tmp_path, channels=FakeChannels({"h1:wa": []}))
    cluster.history = Rows()
    cluster.apply_heartbeat(beat("h1", record("a")))
    return cluster


def rows(cluster: Cluster) -> Rows:
    return cast(Rows, cluster.history)


def worker_calls(cluster: Cluster, *calls: FakeCall) -> list[common_pb2.InferRequest]:
    """The worker at h1:wa answers with these calls; returns the requests it gets."""
    channels = cast(FakeChannels, cluster.channels)
    channels.stubs["h1:wa"].calls.extend(calls)
    return channels.stubs["h1:wa"].requests


def infer(service: QueenService, context: Context, **kw: Any) -> AsyncGenerator[Any, None]:
    request = common_pb2.InferRequest(model="m", prompt="p", max_tokens=5, **kw)
    return cast("AsyncGenerator[Any, None]", service.Infer(request, context))  # type: ignore[arg-type]


async def next_of(stream: AsyncGenerator[Any, None]) -> Any:
    return await anext(stream)


def service_of(cluster: Cluster, **limits: int) -> QueenService:
    return QueenService(cluster, TOKENS, Quotas.of(**limits))


def test_a_caller_counts_as_its_tokens_name_or_without_tokens_its_host(cluster: Cluster) -> None:
    named = service_of(cluster)
    assert named.client_of(Context("t-shop")) == "shop"  # type: ignore[arg-type]
    assert named.client_of(Context("t-admin")) == "admin"  # type: ignore[arg-type]
    anonymous = QueenService(cluster)
    for peer, host in (("ipv4:10.0.0.7:5555", "10.0.0.7"), ("ipv6:%5B::1%5D:9", "::1")):
        assert anonymous.client_of(Context("t-shop", peer)) == host  # type: ignore[arg-type]


async def test_the_queen_makes_its_own_id_and_echoes_the_clients_reference(
    cluster: Cluster,
) -> None:
    sent = worker_calls(cluster, FakeCall([chunk("x"), chunk("y", completion_tokens=2)]))
    watcher = cluster.events.subscribe()
    chunks = [c async for c in infer(service_of(cluster), Context("t-shop"), request_id="mine")]
    assert [c.request_id for c in chunks] == ["mine", "mine"]
    (queen_id,) = rows(cluster).rows
    assert sent[0].request_id == queen_id != "mine" and len(queen_id) == 32
    assert rows(cluster).only() == {
        "policy": common_pb2.ROUTING_POLICY_LEAST_LOADED,  # the model's default (echo workers)
        "client": "shop",
        "client_request_id": "mine",
        "status": queen_pb2.REQUEST_STATUS_COMPLETED,
        "worker": "a",
        "tokens": 2,
        "error": "",
    }
    events = list(watcher.pending)
    assert {(e.request_id, e.client_request_id) for e in events} == {(queen_id, "mine")}
    # Without a reference the chunks carry the queen's id.
    worker_calls(cluster, FakeCall([chunk("z")]))
    chunks = [c async for c in infer(service_of(cluster), Context("t-shop"))]
    assert chunks[0].request_id in rows(cluster).rows and chunks[0].request_id != queen_id


async def test_a_reference_in_flight_is_refused_for_its_client_only(cluster: Cluster) -> None:
    service = service_of(cluster)
    roomy = record("a")
    roomy.slots_total = 2
    cluster.apply_heartbeat(beat("h1", roomy))
    slow = GatedCall(["a", "b"], free=1)
    worker_calls(cluster, slow, FakeCall([chunk("c")]))
    first = infer(service, Context("t-shop"), request_id="order-1")
    await anext(first)
    with pytest.raises(Aborted) as refused:
        await anext(infer(service, Context("t-shop"), request_id="order-1"))
    assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "'order-1'" in refused.value.details
    # Another client's reference is its own.
    other = [c async for c in infer(service, Context("t-search"), request_id="order-1")]
    assert [c.request_id for c in other] == ["order-1"]
    slow.gate.set()
    assert [c.text async for c in first] == ["b"]
    assert service.references._in_flight == set()
    assert len(rows(cluster).rows) == 2  # the refused one never became a row


async def test_a_generator_dropped_at_a_yield_is_recorded_once_by_the_done_callback(
    cluster: Cluster,
) -> None:
    """grpc.aio's order when the call goes while the handler waits to send: done-callbacks,
    then the dropped generator is closed (GeneratorExit)."""
    service = service_of(cluster, max_streams=1)
    worker_calls(cluster, GatedCall(["a", "b", "c"], free=3))
    watcher = cluster.events.subscribe()
    context = Context("t-shop")
    stream = infer(service, context, request_id="r")
    await anext(stream)
    await anext(stream)  # the first chunk's yield returned: it was sent
    with capture_logs() as logs:
        context.done()
    assert [(e["event"], e["waiting_for"]) for e in logs] == [
        ("call ended before the request", "the client")
    ]
    row = rows(cluster).only()
    assert row["status"] == queen_pb2.REQUEST_STATUS_CANCELLED and row["tokens"] == 1
    assert row["error"] == "CANCELLED: the call was cancelled after 1 token chunk(s) were delivered"
    assert cluster.registry.workers["a"].in_flight == 0  # the slot is back before any close
    assert service.quotas.streams.held("shop") == 0
    await stream.aclose()
    assert rows(cluster).finishes == 1
    kinds = [e.kind for e in watcher.pending]
    assert kinds[-1] == queen_pb2.EVENT_KIND_REQUEST_CANCELLED
    assert watcher.pending[-1].detail == row["error"]
    assert (
        cluster.metrics.prometheus.get_sample_value(
            "apiary_requests_total", {"model": "m", "code": "CANCELLED"}
        )
        == 1
    )


async def test_a_generator_closed_at_a_yield_records_even_with_no_callback(
    cluster: Cluster,
) -> None:
    service = service_of(cluster)
    worker_calls(cluster, GatedCall(["a", "b"], free=2))
    context = Context("t-shop", remaining=0.0)  # the deadline has passed
    stream = infer(service, context)
    await anext(stream)
    await stream.aclose()
    row = rows(cluster).only()
    assert row["status"] == queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED and row["tokens"] == 0
    assert cluster.registry.workers["a"].in_flight == 0
    assert service.quotas.streams.held("shop") == 0
    context.done()
    assert rows(cluster).finishes == 1


async def test_a_cancel_while_waiting_for_a_worker_or_a_slot_is_recorded(
    cluster: Cluster,
) -> None:
    service = service_of(cluster, max_queued=1)
    worker_calls(cluster, GatedCall(["a", "b"], free=1))
    # The streams are kept: a generator nobody holds is closed (GeneratorExit) by the GC.
    streams = [infer(service, Context("t-shop")) for _ in range(2)]
    busy = asyncio.create_task(next_of(streams[0]))
    await settle()
    queued = asyncio.create_task(next_of(streams[1]))
    await settle()
    assert service.quotas.queued.held("shop") == 1
    with pytest.raises(Aborted) as refused:  # one of shop's requests is waiting already
        await anext(infer(service, Context("t-shop")))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-queued-per-client" in refused.value.details
    await busy
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    waited = [
        r for r in rows(cluster).rows.values() if r["status"] != queen_pb2.REQUEST_STATUS_RUNNING
    ]
    assert [(r["status"], r["error"]) for r in waited] == [
        (
            queen_pb2.REQUEST_STATUS_CANCELLED,
            "CANCELLED: the call was cancelled while the request waited for a free worker",
        ),
        (queen_pb2.REQUEST_STATUS_FAILED, "RESOURCE_EXHAUSTED: " + refused.value.details),
    ]
    assert service.quotas.queued.held("shop") == 0


async def test_a_cancel_while_awaiting_the_worker_gives_everything_back(cluster: Cluster) -> None:
    service = service_of(cluster)
    call = GatedCall(["a", "b"], free=1)
    worker_calls(cluster, call)
    stream = infer(service, Context("t-shop"), request_id="r")
    await anext(stream)
    reading = asyncio.create_task(next_of(stream))
    await settle()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert rows(cluster).only()["status"] == queen_pb2.REQUEST_STATUS_CANCELLED
    assert call.cancelled and cluster.registry.workers["a"].in_flight == 0
    assert service.quotas.streams.held("shop") == 0 and service.references._in_flight == set()


async def test_waits_count_per_client(cluster: Cluster) -> None:
    quota = Quotas.of(max_queued=1).queued
    desk = cluster.desk
    desk.limit(quota, desk.max_wait)
    taken = await desk.take("shop", Ask("m"), None)  # free: no wait, not counted
    assert quota.held("shop") == 0
    shop = asyncio.create_task(desk.take("shop", Ask("m"), None))
    await settle()
    with pytest.raises(StatusError) as full:
        await desk.take("shop", Ask("m"), None)
    assert "client 'shop' already has 1 requests waiting" in str(full.value)
    search = asyncio.create_task(desk.take("search", Ask("m"), None))
    await settle()
    assert (quota.held("shop"), quota.held("search")) == (1, 1)
    desk.give_back(taken, Outcome(ok=None))
    await shop
    search.cancel()
    await asyncio.gather(search, return_exceptions=True)
    assert quota._held == {}
