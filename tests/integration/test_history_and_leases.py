"""Durable request history across a queen crash, the event stream, and direct leases."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import grpc
import pytest

from harness import Cluster, wait_until
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc, worker_pb2_grpc
from tests.streams import tokens_in


def infer(tokens: int = 4, **kw: Any) -> common_pb2.InferRequest:
    return common_pb2.InferRequest(model="demo", prompt="a b c", max_tokens=tokens, **kw)


async def collect(stub: Any, request: common_pb2.InferRequest, timeout: float = 20) -> list[Any]:
    return [c async for c in stub.Infer(request, timeout=timeout)]


async def test_history_survives_a_queen_crash_and_running_requests_are_marked_failed(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo,count=2,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 2)
    stub, admin = cluster.queen_stub(queen), cluster.admin_stub(queen)
    for i in range(3):
        await collect(stub, infer(request_id=f"done-{i}"))
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(stub, infer(request_id="bad", tokens=10**6))  # refused before acceptance
    running = asyncio.create_task(collect(stub, infer(tokens=100, request_id="cut-short")))

    async def is_running() -> bool:
        reply = await admin.ListRequests(
            queen_pb2.ListRequestsRequest(status=queen_pb2.REQUEST_STATUS_RUNNING)
        )
        return [r.client_request_id for r in reply.requests] == ["cut-short"]

    await wait_until(is_running)
    port = queen.port
    queen.signal(signal.SIGKILL)
    queen.wait(5)
    with pytest.raises(grpc.aio.AioRpcError):
        await running
    queen = cluster.start_queen(port)
    admin = cluster.admin_stub(queen)
    listed = (await admin.ListRequests(queen_pb2.ListRequestsRequest())).requests
    # Keyed by the client's references; the queen's own ids are its own, one per request.
    records = {r.client_request_id: r for r in listed}
    assert len({r.id for r in listed}) == 4 and "done-0" not in {r.id for r in listed}
    assert set(records) == {"done-0", "done-1", "done-2", "cut-short"}
    for i in range(3):
        done = records[f"done-{i}"]
        assert done.status == queen_pb2.REQUEST_STATUS_COMPLETED and done.completion_tokens == 4
        assert done.worker_id and done.hive_id == "h1" and done.attempts == 1
        assert done.finished_at.ToNanoseconds() >= done.started_at.ToNanoseconds() > 0
    cut = records["cut-short"]
    assert cut.status == queen_pb2.REQUEST_STATUS_FAILED and cut.error == "queen restarted"
    failed = await admin.ListRequests(
        queen_pb2.ListRequestsRequest(status=queen_pb2.REQUEST_STATUS_FAILED)
    )
    assert [r.client_request_id for r in failed.requests] == ["cut-short"]
    other_model = await admin.ListRequests(queen_pb2.ListRequestsRequest(model="nope"))
    assert list(other_model.requests) == []
    newest = await admin.ListRequests(queen_pb2.ListRequestsRequest(limit=1))
    assert [r.client_request_id for r in newest.requests] == ["cut-short"]


async def test_events_stream_requests_and_worker_changes(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    admin = cluster.admin_stub(queen)
    events = admin.WatchEvents(queen_pb2.WatchEventsRequest())
    seen: list[queen_pb2.Event] = []

    async def watch() -> None:
        async for event in events:
            seen.append(event)

    watcher = asyncio.create_task(watch())
    registry = queen_pb2_grpc.QueenRegistryStub(cluster.channel(queen.address))

    async def subscribed() -> bool:
        """The stream is live once it shows a probe hive joining (and leaving again)."""
        if any(e.hive_id == "probe" for e in seen):
            return True
        await registry.Heartbeat(queen_pb2.HiveHeartbeat(hive_id="probe", address="127.0.0.1:1"))
        await registry.Heartbeat(queen_pb2.HiveHeartbeat(hive_id="probe", leaving=True))
        return False

    await wait_until(subscribed)  # before anything this test watches for happens
    cluster.start_hive(queen, "h1", "model=demo,load_delay=0.3")
    await cluster.wait_workers(queen, "demo", 1)
    await collect(cluster.queen_stub(queen), infer(request_id="r1"))

    def kinds(hive_id: str = "") -> list[str]:
        return [
            queen_pb2.EventKind.Name(e.kind).removeprefix("EVENT_KIND_")
            for e in seen
            if e.hive_id == hive_id or not hive_id
        ]

    async def complete() -> bool:
        return "REQUEST_COMPLETED" in kinds()

    await wait_until(complete)
    watcher.cancel()
    order = kinds("h1")
    for kind in ("HIVE_JOINED", "WORKER_JOINED", "WORKER_STATE_CHANGED"):
        assert kind in order
    requests = [e for e in seen if e.client_request_id == "r1"]
    assert [queen_pb2.EventKind.Name(e.kind) for e in requests] == [
        "EVENT_KIND_REQUEST_QUEUED",
        "EVENT_KIND_REQUEST_STARTED",
        "EVENT_KIND_REQUEST_COMPLETED",
    ]
    assert requests[-1].duration_seconds > 0 and requests[-1].worker_id
    assert len({e.request_id for e in requests}) == 1 and requests[0].request_id != "r1"
    changed = next(e for e in seen if e.kind == queen_pb2.EVENT_KIND_WORKER_STATE_CHANGED)
    assert (changed.previous_state, changed.state) == (
        common_pb2.WORKER_STATE_LOADING,
        common_pb2.WORKER_STATE_IDLE,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in admin.WatchEvents(queen_pb2.WatchEventsRequest(kinds=[999])):  # type: ignore[list-item]
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_direct_lease_reserves_a_slot_until_the_call_ends_or_the_lease_expires(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo,token_delay=0.05")
    (worker,) = await cluster.wait_workers(queen, "demo", 1)
    stub = cluster.queen_stub(queen)

    async def model() -> queen_pb2.ModelInfo:
        return (await stub.ListModels(queen_pb2.ListModelsRequest())).models[0]

    lease = await stub.Lease(queen_pb2.LeaseRequest(model="demo", ttl_seconds=10))
    assert (lease.worker_id, lease.address) == (worker.id, worker.address)
    assert (await model()).busy == 1
    # The slot is taken: a routed request has to wait.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, infer(), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    direct = worker_pb2_grpc.WorkerStub(cluster.channel(lease.address))
    # Without the lease the worker refuses: its one slot is held.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(direct, infer())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    chunks = await collect(direct, infer(tokens=10, lease_id=lease.lease_id))
    assert tokens_in(chunks) == 10

    async def idle() -> bool:
        return (await model()).idle == 1

    await wait_until(idle, timeout=3)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(direct, infer(lease_id=lease.lease_id))  # a lease is good for one call
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    got = await cluster.admin_stub(queen).GetWorker(queen_pb2.GetWorkerRequest(worker_id=worker.id))
    assert got.worker.requests_completed == 1

    short = await stub.Lease(queen_pb2.LeaseRequest(model="demo", ttl_seconds=0.3))
    await wait_until(idle, timeout=3)  # expired unused: the slot came back
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(direct, infer(lease_id=short.lease_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    early = await stub.Lease(queen_pb2.LeaseRequest(model="demo", ttl_seconds=60))
    assert (await model()).busy == 1

    async def worker_serves_others() -> bool:
        try:
            await collect(direct, infer(tokens=1))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False
        return True

    async def worker_holds_it() -> bool:
        return not await worker_serves_others()

    await wait_until(worker_holds_it)  # the worker heard of the lease
    await stub.ReleaseLease(queen_pb2.ReleaseLeaseRequest(lease_id=early.lease_id))
    await wait_until(idle, timeout=3)
    await wait_until(worker_serves_others)  # and heard it was given back: no call may use it
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(direct, infer(lease_id=early.lease_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReleaseLease(queen_pb2.ReleaseLeaseRequest(lease_id=early.lease_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Lease(queen_pb2.LeaseRequest(model="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
