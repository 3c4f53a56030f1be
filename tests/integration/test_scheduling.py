"""The queen as a scheduler, with real processes: health states, policies, tags, failover,
circuit breaker, autospawn, drains, events, request history and direct leases."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from typing import Any

import grpc
import pytest

from apiary.client import AsyncClient
from harness import Cluster, Proc, wait_until
from protos.v1 import common_pb2, queen_pb2
from tests.streams import tokens_in


def infer(model: str = "demo", tokens: int = 4, **kw: Any) -> common_pb2.InferRequest:
    return common_pb2.InferRequest(model=model, prompt="a b c", max_tokens=tokens, **kw)


async def collect(stub: Any, request: common_pb2.InferRequest, timeout: float = 20) -> list[Any]:
    return [c async for c in stub.Infer(request, timeout=timeout)]


async def hive_health(cluster: Cluster, queen: Proc, hive_id: str) -> int | None:
    hives = (await cluster.admin_stub(queen).ListHives(queen_pb2.ListHivesRequest())).hives
    return next((h.health for h in hives if h.id == hive_id), None)


async def test_hive_goes_degraded_unhealthy_removed_and_rejoins_with_same_workers(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen(0, "--hive-ttl", "6")  # 6 x 0.2 s
    hive = cluster.start_hive(queen, "h1", "model=demo,count=2")
    before = {w.id for w in await cluster.wait_workers(queen, "demo", 2)}
    events = cluster.admin_stub(queen).WatchEvents(
        queen_pb2.WatchEventsRequest(
            kinds=[
                queen_pb2.EVENT_KIND_HIVE_HEALTH_CHANGED,
                queen_pb2.EVENT_KIND_HIVE_REMOVED,
                queen_pb2.EVENT_KIND_HIVE_JOINED,
            ]
        )
    )
    seen: list[queen_pb2.Event] = []

    async def watch() -> None:
        async for event in events:
            seen.append(event)

    watcher = asyncio.create_task(watch())
    hive.signal(signal.SIGSTOP)
    try:
        await wait_until(lambda: _has(seen, queen_pb2.EVENT_KIND_HIVE_REMOVED), timeout=10)
        listed = await cluster.admin_stub(queen).ListWorkers(queen_pb2.ListWorkersRequest())
        assert list(listed.workers) == []
    finally:
        hive.signal(signal.SIGCONT)
    after = {w.id for w in await cluster.wait_workers(queen, "demo", 2)}
    assert after == before

    async def rejoined() -> bool:
        return bool(seen) and seen[-1].kind == queen_pb2.EVENT_KIND_HIVE_JOINED

    await wait_until(rejoined, timeout=5)
    watcher.cancel()
    healths = [e.health for e in seen if e.kind == queen_pb2.EVENT_KIND_HIVE_HEALTH_CHANGED]
    assert healths[:2] == [common_pb2.HIVE_HEALTH_DEGRADED, common_pb2.HIVE_HEALTH_UNHEALTHY]
    removed = [e.kind for e in seen].index(queen_pb2.EVENT_KIND_HIVE_REMOVED)
    assert queen_pb2.EVENT_KIND_HIVE_JOINED in [e.kind for e in seen][removed:]


async def _has(seen: list[queen_pb2.Event], kind: int) -> bool:
    return any(e.kind == kind for e in seen)


async def test_routing_policy_per_queen_and_per_request(cluster: Cluster) -> None:
    queen = cluster.start_queen(0, "--policy", "lru")
    hive = cluster.start_hive(queen, "h1", "model=demo,slots=3,token_delay=0.05", "model=demo")
    await cluster.wait_workers(queen, "demo", 2)
    stub = cluster.queen_stub(queen)
    # lru alternates between the two, whatever their free slots.
    first = await asyncio.gather(*(collect(stub, infer()) for _ in range(2)))
    assert len({c[0].worker_id for c in first}) == 2
    # least-loaded (per request) fills the 3-slot worker before the 1-slot one.
    busy = [
        asyncio.create_task(
            collect(stub, infer(tokens=20, policy=common_pb2.ROUTING_POLICY_LEAST_LOADED))
        )
        for _ in range(3)
    ]
    served = [c[0].worker_id for c in await asyncio.gather(*busy)]
    workers = {w.slots_total: w.id for w in await cluster.wait_workers(queen, "demo", 2)}
    assert served.count(workers[3]) >= 2
    for policy in (
        common_pb2.ROUTING_POLICY_SCORE,
        common_pb2.ROUTING_POLICY_LOTTERY,
        common_pb2.ROUTING_POLICY_SHORTEST_QUEUE,
    ):
        assert tokens_in(await collect(stub, infer(policy=policy))) == 4
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, infer(policy=42))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    del hive


async def test_tags_select_workers_and_filter_listings(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo,tags=gpu+eu,slots=2", "model=demo")
    await cluster.wait_workers(queen, "demo", 2)
    stub = cluster.queen_stub(queen)
    admin = cluster.admin_stub(queen)
    tagged = (await admin.ListWorkers(queen_pb2.ListWorkersRequest(tags=["gpu"]))).workers
    assert len(tagged) == 1 and sorted(tagged[0].tags) == ["eu", "gpu"]
    for _ in range(4):
        chunks = await collect(stub, infer(required_tags=["gpu"]))
        assert chunks[0].worker_id == tagged[0].id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, infer(required_tags=["tpu"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "tpu" in (err.value.details() or "") and "eu,gpu" in (err.value.details() or "")
    roomy = (await admin.ListWorkers(queen_pb2.ListWorkersRequest(min_free_slots=2))).workers
    assert [w.id for w in roomy] == [tagged[0].id]
    healthy = await admin.ListWorkers(
        queen_pb2.ListWorkersRequest(hive_health=common_pb2.HIVE_HEALTH_HEALTHY)
    )
    assert len(healthy.workers) == 2
    degraded = await admin.ListWorkers(
        queen_pb2.ListWorkersRequest(hive_health=common_pb2.HIVE_HEALTH_DEGRADED)
    )
    assert list(degraded.workers) == []


async def test_failing_worker_is_retried_around_and_its_circuit_opens(cluster: Cluster) -> None:
    queen = cluster.start_queen(0, "--breaker-failures", "3", "--breaker-cooldown", "30")
    cluster.start_hive(queen, "h1", "model=demo,fault_fail_requests=1", "model=demo")
    workers = await cluster.wait_workers(queen, "demo", 2)
    stub = cluster.queen_stub(queen)
    admin = cluster.admin_stub(queen)
    # Every request succeeds: a failure before the first chunk is retried on the other worker.
    results = [await collect(stub, infer()) for _ in range(8)]
    good = {c[0].worker_id for c in results}
    assert len(good) == 1
    bad = next(w.id for w in workers if w.id not in good)
    got = (await admin.GetWorker(queen_pb2.GetWorkerRequest(worker_id=bad))).worker
    assert got.circuit_open_seconds > 20
    assert got.stats.consecutive_failures == 3 and got.requests_failed == 3
    ok = (await admin.GetWorker(queen_pb2.GetWorkerRequest(worker_id=good.pop()))).worker
    assert ok.requests_completed == 8 and ok.stats.success_rate == 1.0
    assert ok.stats.tokens_per_second > 0 and ok.stats.p50_duration_seconds > 0
    history = (await admin.ListRequests(queen_pb2.ListRequestsRequest(limit=8))).requests
    assert sum(r.attempts for r in history) == 8 + 3  # three of them needed a second attempt


# Two echo workers the hive does not bring back when killed.
TWO_MORTAL = "model=demo,restart=never,count=2"


async def kill_serving_worker(cluster: Cluster, queen: Proc, call: Any) -> list[Any]:
    """Read a few chunks of `call`, then SIGKILL the worker serving it; the chunks read."""
    chunks = [await call.read() for _ in range(5)]
    assert all(isinstance(c, common_pb2.InferChunk) for c in chunks)
    request = queen_pb2.GetWorkerRequest(worker_id=chunks[0].worker_id)
    worker = (await cluster.admin_stub(queen).GetWorker(request)).worker
    os.kill(worker.pid, signal.SIGKILL)
    return chunks


async def read_rest(call: Any, chunks: list[Any]) -> list[Any]:
    while isinstance(chunk := await call.read(), common_pb2.InferChunk):
        chunks.append(chunk)
    return chunks


async def test_a_worker_killed_mid_stream_the_stream_goes_on_from_the_exact_token(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, f"mig-{uuid.uuid4().hex[:8]}", f"{TWO_MORTAL},token_delay=0.02")
    await cluster.wait_workers(queen, "demo", 2)
    stub, admin = cluster.queen_stub(queen), cluster.admin_stub(queen)
    whole = "".join(c.text for c in await collect(stub, infer(tokens=60)))
    call = stub.Infer(infer(tokens=60, request_id="moved"), timeout=30)
    chunks = await read_rest(call, await kill_serving_worker(cluster, queen, call))
    # One stream, no gap, no repeat; usage covers the whole completion.
    assert "".join(c.text for c in chunks) == whole and tokens_in(chunks) == 60
    assert chunks[-1].completion_tokens == 60
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [c.index for c in chunks] == list(range(len(chunks)))
    movers = [c.worker_id for c in chunks if c.worker_id]
    assert len(movers) == 2 and movers[0] != movers[1]  # the new worker names itself
    (row,) = (await admin.ListRequests(queen_pb2.ListRequestsRequest(limit=1))).requests
    assert (row.client_request_id, row.status) == ("moved", queen_pb2.REQUEST_STATUS_COMPLETED)
    assert (row.migrations, row.worker_id, row.completion_tokens) == (1, movers[1], 60)


async def test_with_no_migration_a_failure_after_the_first_chunk_is_reported_not_repeated(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen(0, "--migration-limit", "0")
    cluster.start_hive(queen, f"mig-{uuid.uuid4().hex[:8]}", f"{TWO_MORTAL},token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 2)
    call = cluster.queen_stub(queen).Infer(infer(tokens=100))
    await kill_serving_worker(cluster, queen, call)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_rest(call, [])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    details = err.value.details() or ""
    assert "token chunk(s) were delivered" in details and "--migration-limit 0" in details
    # The client library takes the queen's word: its message quotes the worker's connection
    # error, but a live queen gave it, so the stream is not resumed behind the operator's back.
    async with AsyncClient(queen.address, timeout=30) as client:
        stream = client.infer("demo", "one two three", max_tokens=100)
        first = await anext(stream)
        (worker,) = [w for w in await client.admin.list_workers() if w.id == first.worker_id]
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as again:
            async for _ in stream:
                pass
        assert "--migration-limit 0" in (again.value.details() or "")
        assert client.resumes == 0


async def test_autospawn_starts_exactly_one_worker_for_concurrent_requests(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen(0, "--autospawn", "lazy=echo,load_delay=0.5")
    cluster.start_hive(queen, "h1")
    admin = cluster.admin_stub(queen)
    await wait_until(lambda: _hive_known(admin))
    stub = cluster.queen_stub(queen)
    results = await asyncio.gather(*(collect(stub, infer(model="lazy")) for _ in range(6)))
    assert all(tokens_in(r) == 4 for r in results)
    workers = (await admin.ListWorkers(queen_pb2.ListWorkersRequest(model="lazy"))).workers
    assert len(workers) == 1
    hive = (await admin.GetHive(queen_pb2.GetHiveRequest(hive_id="h1"))).hive
    assert hive.stats.spawns == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, infer(model="unplanned"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "autospawn offers: lazy" in (err.value.details() or "")


async def _hive_known(admin: Any) -> bool:
    return bool((await admin.ListHives(queen_pb2.ListHivesRequest())).hives)


async def test_drain_lets_streams_finish_stops_new_ones_and_survives_a_queen_restart(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo,count=2,token_delay=0.05")
    workers = await cluster.wait_workers(queen, "demo", 2)
    stub, admin = cluster.queen_stub(queen), cluster.admin_stub(queen)
    streaming = asyncio.create_task(collect(stub, infer(tokens=20)))
    await wait_until(lambda: _busy_worker(admin))
    busy_id = await _busy_worker(admin)
    assert busy_id
    reply = await admin.DrainWorker(queen_pb2.DrainWorkerRequest(worker_id=busy_id))
    assert reply.worker.drained
    assert len(await streaming) == 20  # in-flight stream finished
    other = next(w.id for w in workers if w.id != busy_id)
    for _ in range(3):
        assert (await collect(stub, infer()))[0].worker_id == other
    await admin.DrainHive(queen_pb2.DrainHiveRequest(hive_id="h1"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, infer(), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    port = queen.port
    queen.signal(signal.SIGKILL)
    queen.wait(5)
    queen = cluster.start_queen(port)
    admin = cluster.admin_stub(queen)
    await cluster.wait_workers(queen, "demo", 2)
    hive = (await admin.GetHive(queen_pb2.GetHiveRequest(hive_id="h1"))).hive
    assert hive.drained
    await admin.DrainHive(queen_pb2.DrainHiveRequest(hive_id="h1", undrain=True))
    served = {(await collect(cluster.queen_stub(queen), infer()))[0].worker_id for _ in range(4)}
    assert served == {other}  # the worker drain outlived the restart too
    await admin.DrainWorker(queen_pb2.DrainWorkerRequest(worker_id=busy_id, undrain=True))
    served = {(await collect(cluster.queen_stub(queen), infer()))[0].worker_id for _ in range(4)}
    assert served == {w.id for w in workers}


async def _busy_worker(admin: Any) -> str:
    workers = (
        await admin.ListWorkers(queen_pb2.ListWorkersRequest(state=common_pb2.WORKER_STATE_BUSY))
    ).workers
    return workers[0].id if workers else ""


async def test_request_waiting_on_a_frozen_hive_moves_to_another_before_its_first_token(
    cluster: Cluster,
) -> None:
    import psutil

    queen = cluster.start_queen()
    frozen = cluster.start_hive(queen, "h1", "model=demo,token_delay=0.01")
    await cluster.wait_workers(queen, "demo", 1)
    cluster.start_hive(queen, "h2", "model=demo,token_delay=0.01")
    await cluster.wait_workers(queen, "demo", 2)
    stub = cluster.queen_stub(queen)
    # Freeze the whole of h1, hive and worker: like a machine cut off, it answers nothing.
    procs = [psutil.Process(frozen.pid), *psutil.Process(frozen.pid).children()]
    for proc in procs:
        proc.suspend()
    try:
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(collect(stub, infer(tokens=5)) for _ in range(6)))
        took = asyncio.get_running_loop().time() - started
    finally:
        for proc in procs:
            proc.resume()
    assert all(tokens_in(r) == 5 for r in results)  # none lost, none failed
    h2_workers = (
        await cluster.admin_stub(queen).ListWorkers(queen_pb2.ListWorkersRequest(hive_id="h2"))
    ).workers
    assert {r[0].worker_id for r in results} == {h2_workers[0].id}
    # Moved once the hive missed 3 heartbeat intervals of 0.2 s (tests/unit/test_cluster.py
    # proves that rule on a fake clock): well before keepalive (15 s) would have noticed.
    assert took < 8.0
    history = (
        await cluster.admin_stub(queen).ListRequests(queen_pb2.ListRequestsRequest(limit=6))
    ).requests
    assert any(r.attempts == 2 for r in history)


async def test_a_request_every_worker_failed_ends_at_once_not_at_its_deadline(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo,fault_fail_requests=1")
    await cluster.wait_workers(queen, "demo", 1)
    started = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(cluster.queen_stub(queen), infer(), timeout=20)
    assert asyncio.get_running_loop().time() - started < 2.0
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "backend error" in (err.value.details() or "")
