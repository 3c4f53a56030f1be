"""Honest request records and limits per named client, against a real queen, hive and echo
workers: the queen's own ids beside the client's reference, one record (history row, event)
however a call ends, and one busy client never locking out another."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from harness import Cluster, Proc, stays_true, wait_until
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc
from tests.streams import tokens_in

# One word of 60 kB: the echo worker streams it back as one chunk per token, so a client that
# stops reading fills the HTTP/2 window at once and the queen's handler waits at a yield.
BIG_WORD = "x" * 60_000
Status = queen_pb2.RequestStatus


def own_hive_id() -> str:
    """A hive id no other run on this machine uses: a starting hive adopts every live worker
    process of its id it finds, a concurrent test's included."""
    return f"rq-{uuid.uuid4().hex[:8]}"


def infer(tokens: int = 100, **kw: Any) -> common_pb2.InferRequest:
    fields: dict[str, Any] = {"model": "demo", "prompt": "a b c", "max_tokens": tokens, **kw}
    return common_pb2.InferRequest(**fields)


async def collect(stub: Any, request: common_pb2.InferRequest, timeout: float = 20) -> list[Any]:
    return [c async for c in stub.Infer(request, timeout=timeout)]


async def next_chunk(call: Any) -> common_pb2.InferChunk:
    chunk = await call.read()
    assert isinstance(chunk, common_pb2.InferChunk), chunk
    return chunk


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return err.value


class History:
    """The queen's request history and request events, as a client's references name them."""

    def __init__(self, cluster: Cluster, queen: Proc) -> None:
        self.admin = cluster.admin_stub(queen)
        self.registry = queen_pb2_grpc.QueenRegistryStub(cluster.channel(queen.address))
        self.events: list[queen_pb2.Event] = []
        self.watching = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        async for event in self.admin.WatchEvents(queen_pb2.WatchEventsRequest()):
            self.events.append(event)

    async def subscribed(self) -> None:
        """The event stream is live once it shows a probe hive joining."""

        async def seen() -> bool:
            if any(e.hive_id == "probe" for e in self.events):
                return True
            beat = queen_pb2.HiveHeartbeat(hive_id="probe", address="127.0.0.1:1")
            await self.registry.Heartbeat(beat)
            await self.registry.Heartbeat(queen_pb2.HiveHeartbeat(hive_id="probe", leaving=True))
            return False

        await wait_until(seen)

    async def rows(self, reference: str) -> list[queen_pb2.RequestRecord]:
        listed = await self.admin.ListRequests(queen_pb2.ListRequestsRequest(limit=1000))
        return [r for r in listed.requests if r.client_request_id == reference]

    async def ended(self, reference: str, status: int, timeout: float = 15) -> Any:
        """The one row of `reference` once it has `status`, and the request's last event."""

        async def done() -> tuple[queen_pb2.RequestRecord, queen_pb2.Event] | None:
            rows = await self.rows(reference)
            ends = [e for e in self.events if e.client_request_id == reference]
            if len(rows) == 1 and rows[0].status == status and ends:
                return rows[0], ends[-1]
            return None

        return await wait_until(done, timeout)

    def close(self) -> None:
        self.watching.cancel()


def kind(event: queen_pb2.Event) -> str:
    return queen_pb2.EventKind.Name(event.kind).removeprefix("EVENT_KIND_")


def early_ends(queen: Proc) -> list[tuple[str, str]]:
    """(client reference, what the handler was waiting for) of each call the queen saw end
    before its request, from its JSON log. Waiting for the client: suspended at a yield, so
    grpc.aio ends the handler by closing it (GeneratorExit); else CancelledError at an await."""
    found = []
    for line in queen.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "call ended before the request":
            found.append((entry["client_request_id"], entry["waiting_for"]))
    return found


async def test_a_cancelled_stream_is_recorded_and_references_are_the_clients_own(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, own_hive_id(), "model=demo,count=2,token_delay=0.3")
    await cluster.wait_workers(queen, "demo", 2)
    stub, history = cluster.queen_stub(queen), History(cluster, queen)
    await history.subscribed()
    call = stub.Infer(infer(request_id="order-1"), timeout=60)
    chunks = [await next_chunk(call) for _ in range(3)]
    assert [c.request_id for c in chunks] == ["order-1"] * 3  # the client's reference, echoed
    # While it is in flight the reference names it: a second is refused, naming it.
    err = await refusal(stub.Infer(infer(request_id="order-1")))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "'order-1'" in (err.details() or "")
    # Well inside the 0.3 s the queen now waits for the worker's next token: it is awaiting.
    await asyncio.sleep(0.1)
    call.cancel()
    row, event = await history.ended("order-1", Status.REQUEST_STATUS_CANCELLED)
    assert row.completion_tokens >= 3 and row.client == "127.0.0.1"
    assert row.error.startswith("CANCELLED: the call was cancelled after")
    assert kind(event) == "REQUEST_CANCELLED" and event.detail == row.error
    assert event.request_id == row.id and len(row.id) == 32
    assert early_ends(queen) == [("order-1", "a worker or a slot")]

    # Once it has ended the reference may be used again: a new row, with its own id.
    again = await collect(stub, infer(tokens=2, request_id="order-1"))
    assert [c.request_id for c in again] == ["order-1", "order-1"]
    rows = await history.rows("order-1")
    assert len(rows) == 2 and len({r.id for r in rows}) == 2
    # A reference that happens to be another request's id is still only a reference.
    await collect(stub, infer(tokens=2, request_id=row.id))
    listed = await history.admin.ListRequests(queen_pb2.ListRequestsRequest())
    (original,) = [r for r in listed.requests if r.id == row.id]
    assert original.status == Status.REQUEST_STATUS_CANCELLED and original.client_request_id
    # Without a reference the chunks carry the queen's id: the row's.
    (plain,) = await collect(stub, infer(tokens=1))
    listed = await history.admin.ListRequests(queen_pb2.ListRequestsRequest(limit=1))
    assert plain.request_id == listed.requests[0].id and not listed.requests[0].client_request_id
    history.close()


async def test_a_client_that_stops_reading_then_goes_is_recorded_both_ways(
    cluster: Cluster,
) -> None:
    """The handler waits at a yield (the client reads nothing), so grpc.aio ends it by closing
    the dropped generator (GeneratorExit), for a cancel and for a deadline alike."""
    queen = cluster.start_queen()
    cluster.start_hive(queen, own_hive_id(), "model=demo,count=2")
    await cluster.wait_workers(queen, "demo", 2)
    stub, history = cluster.queen_stub(queen), History(cluster, queen)
    await history.subscribed()
    big: dict[str, Any] = {"prompt": BIG_WORD, "tokens": 2000}
    cancelled = stub.Infer(infer(request_id="stalled-cancel", **big), timeout=30)
    expiring = stub.Infer(infer(request_id="stalled-deadline", **big), timeout=3)
    for call in (cancelled, expiring):
        assert len((await next_chunk(call)).text) == len(BIG_WORD)

    async def stalled() -> bool:
        """Both are still running: the queen is stuck sending, not finished."""
        rows = [*(await history.rows("stalled-cancel")), *(await history.rows("stalled-deadline"))]
        return [r.status for r in rows] == [Status.REQUEST_STATUS_RUNNING] * 2

    await wait_until(stalled)
    # Nothing shows the queen has filled the client's window and is stuck sending; a second
    # of both staying unfinished (the worker makes a chunk in microseconds) is plenty.
    await stays_true(stalled, 1.0)
    cancelled.cancel()
    row, event = await history.ended("stalled-cancel", Status.REQUEST_STATUS_CANCELLED)
    assert kind(event) == "REQUEST_CANCELLED" and row.error.startswith("CANCELLED:")
    assert row.completion_tokens >= 1
    assert await expiring.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    row, event = await history.ended("stalled-deadline", Status.REQUEST_STATUS_DEADLINE_EXCEEDED)
    assert kind(event) == "REQUEST_FAILED" and event.detail.startswith("DEADLINE_EXCEEDED:")
    assert row.error == event.detail and row.completion_tokens >= 1

    assert sorted(early_ends(queen)) == [
        ("stalled-cancel", "the client"),
        ("stalled-deadline", "the client"),
    ]

    async def slots_back() -> bool:
        (model,) = (await stub.ListModels(queen_pb2.ListModelsRequest())).models
        return model.busy == 0 and model.idle == 2

    await wait_until(slots_back)
    history.close()


async def test_deadlines_mid_stream_and_in_the_queue_and_a_cancel_in_the_queue(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, own_hive_id(), "model=demo,token_delay=0.1")
    await cluster.wait_workers(queen, "demo", 1)
    stub, history = cluster.queen_stub(queen), History(cluster, queen)
    await history.subscribed()
    running = asyncio.create_task(collect(stub, infer(request_id="slow"), timeout=4))

    async def started() -> bool:
        return [r.status for r in await history.rows("slow")] == [Status.REQUEST_STATUS_RUNNING]

    await wait_until(started)
    waiting = asyncio.create_task(collect(stub, infer(request_id="waits"), timeout=0.5))
    leaving = stub.Infer(infer(request_id="leaves"), timeout=20)
    reading = asyncio.create_task(leaving.read())

    async def queued() -> bool:
        models = await stub.ListModels(queen_pb2.ListModelsRequest())
        return models.models[0].queued == 2

    await wait_until(queued)
    leaving.cancel()
    row, event = await history.ended("leaves", Status.REQUEST_STATUS_CANCELLED)
    assert row.error == (
        "CANCELLED: the call was cancelled while the request waited for a free worker"
    )
    assert kind(event) == "REQUEST_CANCELLED" and not row.worker_id and row.attempts == 0
    await asyncio.gather(reading, return_exceptions=True)
    for task, reference in ((waiting, "waits"), (running, "slow")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await task
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        row, event = await history.ended(reference, Status.REQUEST_STATUS_DEADLINE_EXCEEDED)
        assert kind(event) == "REQUEST_FAILED" and event.detail.startswith("DEADLINE_EXCEEDED:")
        assert row.error == event.detail
    (slow,) = await history.rows("slow")
    assert slow.completion_tokens >= 10 and slow.worker_id  # about 4 s of 0.1 s tokens
    (waits,) = await history.rows("waits")
    assert waits.completion_tokens == 0 and waits.attempts == 0
    history.close()


async def test_a_stream_cut_by_its_worker_records_the_tokens_delivered(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, own_hive_id(), "model=demo,token_delay=0.05,restart=never")
    (worker,) = await cluster.wait_workers(queen, "demo", 1)
    stub, history = cluster.queen_stub(queen), History(cluster, queen)
    await history.subscribed()
    call = stub.Infer(infer(request_id="cut"), timeout=20)
    received = [await next_chunk(call) for _ in range(5)]
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while True:  # until the error: a clean end would fail next_chunk's check
            received.append(await next_chunk(call))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    row, event = await history.ended("cut", Status.REQUEST_STATUS_FAILED)
    assert row.completion_tokens == len(received)  # what reached the client, not 0
    assert kind(event) == "REQUEST_FAILED" and "failed after" in row.error
    history.close()


def named_clients(cluster: Cluster) -> dict[str, str]:
    """A tokens file with admin and (shared) hive tokens and two named clients."""
    tokens: dict[str, Any] = {role: secrets.token_urlsafe(16) for role in ("admin", "hive")}
    tokens["clients"] = {"shop": secrets.token_urlsafe(16), "search": secrets.token_urlsafe(16)}
    path = Path(cluster.tmp) / "tokens.json"
    path.write_text(json.dumps(tokens))
    cluster.server_args = ["--tokens-file", str(path)]
    cluster.token = tokens["admin"]
    return {"admin": tokens["admin"], **tokens["clients"]}


async def test_stream_and_lease_limits_are_per_named_client(cluster: Cluster) -> None:
    tokens = named_clients(cluster)
    queen = cluster.start_queen(
        0, "--max-streams-per-client", "1", "--max-leases-per-client", "1",
        "--max-lease-ttl", "20",
    )  # fmt: skip
    cluster.start_hive(queen, own_hive_id(), "model=demo,slots=4,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 1)
    shop = queen_pb2_grpc.QueenStub(cluster.channel(queen.address, tokens["shop"]))
    search = queen_pb2_grpc.QueenStub(cluster.channel(queen.address, tokens["search"]))
    holding = shop.Infer(infer(request_id="hold"), timeout=30)
    await next_chunk(holding)
    err = await refusal(shop.Infer(infer(tokens=1)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "client 'shop'" in (err.details() or "")
    assert "--max-streams-per-client" in (err.details() or "")
    assert tokens_in(await collect(search, infer(tokens=3))) == 3  # shop's limit is shop's alone

    lease = await shop.Lease(queen_pb2.LeaseRequest(model="demo", ttl_seconds=20))
    err = await refusal(shop.Lease(queen_pb2.LeaseRequest(model="demo")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "client 'shop'" in (err.details() or "")
    assert "--max-leases-per-client" in (err.details() or "")
    other = await search.Lease(queen_pb2.LeaseRequest(model="demo"))
    err = await refusal(search.Lease(queen_pb2.LeaseRequest(model="demo", ttl_seconds=21)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "0..20" in (err.details() or "") and "--max-lease-ttl" in (err.details() or "")
    await shop.ReleaseLease(queen_pb2.ReleaseLeaseRequest(lease_id=lease.lease_id))

    async def shop_may_lease_again() -> bool:
        try:
            await shop.Lease(queen_pb2.LeaseRequest(model="demo", ttl_seconds=1))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return False
            raise
        return True

    await wait_until(shop_may_lease_again)  # the released lease no longer counts
    await search.ReleaseLease(queen_pb2.ReleaseLeaseRequest(lease_id=other.lease_id))
    holding.cancel()
    admin = cluster.admin_stub(queen)

    async def recorded() -> queen_pb2.RequestRecord | None:
        listed = await admin.ListRequests(queen_pb2.ListRequestsRequest())
        rows = [r for r in listed.requests if r.client_request_id == "hold"]
        return rows[0] if rows and rows[0].status == Status.REQUEST_STATUS_CANCELLED else None

    row = await wait_until(recorded)
    assert row.client == "shop"
    assert tokens_in(await collect(shop, infer(tokens=2))) == 2  # its stream was given back


async def test_one_clients_queue_is_limited_and_another_still_waits_its_turn(
    cluster: Cluster,
) -> None:
    tokens = named_clients(cluster)
    queen = cluster.start_queen(0, "--max-streams-per-client", "3", "--max-queued-per-client", "1")
    cluster.start_hive(queen, own_hive_id(), "model=demo,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 1)
    shop = queen_pb2_grpc.QueenStub(cluster.channel(queen.address, tokens["shop"]))
    search = queen_pb2_grpc.QueenStub(cluster.channel(queen.address, tokens["search"]))
    served = asyncio.create_task(collect(shop, infer(tokens=20)))

    async def queued(n: int) -> bool:
        (model,) = (await shop.ListModels(queen_pb2.ListModelsRequest())).models
        return model.busy == 1 and model.queued == n

    await wait_until(lambda: queued(0))
    waiting = asyncio.create_task(collect(shop, infer(tokens=2)))
    await wait_until(lambda: queued(1))
    err = await refusal(shop.Infer(infer(tokens=2)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = err.details() or ""
    assert "client 'shop'" in details and "--max-queued-per-client" in details
    # Another client is not locked out: its request waits its turn and is served.
    theirs = asyncio.create_task(collect(search, infer(tokens=2)))
    await wait_until(lambda: queued(2))
    results = await asyncio.gather(served, waiting, theirs)
    assert [tokens_in(r) for r in results] == [20, 2, 2]
