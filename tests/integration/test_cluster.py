"""A real queen, a real hive and real echo worker processes, over real sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import grpc
import psutil
import pytest

from harness import Cluster, wait_until
from protos.v1 import common_pb2, queen_pb2, worker_pb2_grpc
from tests.streams import tokens_in

ECHO2 = "model=demo,backend=echo,count=2"


async def collect(
    stub: Any, request: common_pb2.InferRequest, timeout: float = 20
) -> list[common_pb2.InferChunk]:
    return [chunk async for chunk in stub.Infer(request, timeout=timeout)]


def infer(
    prompt: str = "hello bees", max_tokens: int = 8, model: str = "demo"
) -> common_pb2.InferRequest:
    return common_pb2.InferRequest(model=model, prompt=prompt, max_tokens=max_tokens)


async def test_concurrent_requests_all_complete_on_both_workers(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", ECHO2 + ",token_delay=0.01")
    workers = await cluster.wait_workers(queen, "demo", 2)
    stub = cluster.queen_stub(queen)

    results = await asyncio.gather(
        *(collect(stub, infer(f"prompt {i} of many", 8)) for i in range(20))
    )

    for i, chunks in enumerate(results):
        assert tokens_in(chunks) == 8
        assert "".join(c.text for c in chunks) == f"prompt {i} of many prompt {i} of many"
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert chunks[-1].completion_tokens == 8
        assert chunks[0].worker_id
    served = {chunks[0].worker_id for chunks in results}
    assert served == {w.id for w in workers}
    # The queen gave every slot back.
    models = await cluster.queen_stub(queen).ListModels(queen_pb2.ListModelsRequest())
    assert [(m.name, m.idle, m.busy, m.queued) for m in models.models] == [("demo", 2, 0, 0)]
    listed = await cluster.admin_stub(queen).ListWorkers(queen_pb2.ListWorkersRequest())
    assert sum(w.requests_completed for w in listed.workers) == 20


async def test_sigkilled_worker_leaves_routable_set_fast_and_requests_still_succeed(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", ECHO2)
    victim, survivor = await cluster.wait_workers(queen, "demo", 2)
    admin = cluster.admin_stub(queen)

    os.kill(victim.pid, signal.SIGKILL)

    async def victim_failed() -> common_pb2.WorkerRecord | None:
        reply = await admin.GetWorker(queen_pb2.GetWorkerRequest(worker_id=victim.id), timeout=1)
        return reply.worker if reply.worker.state == common_pb2.WORKER_STATE_FAILED else None

    failed = await wait_until(victim_failed, timeout=5)
    # Seen by its hive at once (the timing is bench/detect.py's), not by the hive going silent.
    assert failed.failure_reason == "killed by SIGKILL"
    assert failed.hive_health == common_pb2.HIVE_HEALTH_HEALTHY
    models = await cluster.queen_stub(queen).ListModels(queen_pb2.ListModelsRequest())
    assert (models.models[0].idle, models.models[0].failed) == (1, 1)

    stub = cluster.queen_stub(queen)
    for _ in range(5):
        chunks = await collect(stub, infer())
        assert chunks[0].worker_id == survivor.id
    # The hive reaped it: no zombie left behind.
    assert (
        not psutil.pid_exists(victim.pid)
        or psutil.Process(victim.pid).status() != psutil.STATUS_ZOMBIE
    )


async def test_restarted_queen_relearns_the_cluster_from_heartbeats(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", ECHO2)
    cluster.start_hive(queen, "h2", "model=other,backend=echo,count=1")
    before = await cluster.wait_workers(queen, "demo", 2)
    await cluster.wait_workers(queen, "other", 1)
    port = queen.port

    queen.signal(signal.SIGKILL)
    queen.wait(5)
    restarted = cluster.start_queen(port)
    started = time.monotonic()
    after = await cluster.wait_workers(restarted, "demo", 2, timeout=10)
    await cluster.wait_workers(restarted, "other", 1, timeout=10)
    elapsed = time.monotonic() - started

    assert {w.id for w in after} == {w.id for w in before}
    hives = await cluster.admin_stub(restarted).ListHives(queen_pb2.ListHivesRequest())
    assert sorted(h.id for h in hives.hives) == ["h1", "h2"]
    assert elapsed < 5.0, f"registry took {elapsed:.2f}s to refill"
    chunks = await collect(cluster.queen_stub(restarted), infer(model="other"))
    assert tokens_in(chunks) == 8


async def test_unknown_model_is_not_found_naming_the_models(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", ECHO2)
    await cluster.wait_workers(queen, "demo", 2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(cluster.queen_stub(queen), infer(model="llama-9000"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "llama-9000" in (err.value.details() or "")
    assert "demo" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (common_pb2.InferRequest(model="", prompt="x", max_tokens=1), "model is required"),
        (common_pb2.InferRequest(model="demo", prompt="", max_tokens=1), "prompt"),
        (
            common_pb2.InferRequest(model="demo", prompt="x", max_tokens=-5),
            "max_tokens must be > 0",
        ),
        (common_pb2.InferRequest(model="demo", prompt="x", max_tokens=10**6), "cap"),
        (common_pb2.InferRequest(model="de mo", prompt="x", max_tokens=1), "not allowed"),
    ],
)
async def test_bad_infer_requests_get_invalid_argument(
    cluster: Cluster, request_: common_pb2.InferRequest, needle: str
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo,backend=echo")
    workers = await cluster.wait_workers(queen, "demo", 1)
    stubs = [
        cluster.queen_stub(queen),
        worker_pb2_grpc.WorkerStub(cluster.channel(workers[0].address)),
    ]
    for stub in stubs:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request_)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (err.value.details() or "")
    # Nothing crashed: the cluster still serves.
    assert tokens_in(await collect(cluster.queen_stub(queen), infer())) == 8


async def test_request_waits_for_busy_worker_then_completes(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo,backend=echo,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 1)
    stub = cluster.queen_stub(queen)

    first = asyncio.create_task(collect(stub, infer(max_tokens=20)))  # ~1 s of tokens

    async def busy() -> bool:
        models = await stub.ListModels(queen_pb2.ListModelsRequest())
        return models.models[0].busy == 1

    await wait_until(busy)
    second = asyncio.create_task(collect(stub, infer("second in line", max_tokens=3)))

    async def queued() -> bool:
        models = await stub.ListModels(queen_pb2.ListModelsRequest())
        return models.models[0].queued == 1

    await wait_until(queued)
    assert not second.done()
    first_chunks, second_chunks = await asyncio.gather(first, second)
    assert tokens_in(first_chunks) == 20
    assert "".join(c.text for c in second_chunks) == "second in line"


async def test_deadline_while_waiting_and_full_queue(cluster: Cluster) -> None:
    queen = cluster.start_queen(0, "--max-queue", "1")
    cluster.start_hive(queen, "h1", "model=demo,backend=echo,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 1)
    stub = cluster.queen_stub(queen)
    holder = asyncio.create_task(collect(stub, infer(max_tokens=40)))  # ~2 s
    waiter = asyncio.create_task(collect(stub, infer(max_tokens=1), timeout=20))

    async def queued() -> bool:
        models = await stub.ListModels(queen_pb2.ListModelsRequest())
        return models.models[0].queued == 1

    await wait_until(queued)
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await collect(stub, infer(max_tokens=1))
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in (full.value.details() or "")
    waiter_chunks = await waiter
    assert tokens_in(waiter_chunks) == 1
    await holder

    holder = asyncio.create_task(collect(stub, infer(max_tokens=40)))
    await wait_until(lambda: _busy(stub))
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await collect(stub, infer(max_tokens=1), timeout=0.3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await holder
    # The timed-out waiter left no slot leased: the worker is idle again.
    models = await stub.ListModels(queen_pb2.ListModelsRequest())
    assert (models.models[0].idle, models.models[0].queued) == (1, 0)


async def _busy(stub: Any) -> bool:
    models = await stub.ListModels(queen_pb2.ListModelsRequest())
    return bool(models.models[0].busy)


async def test_cancelled_stream_frees_the_slot(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo,backend=echo,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 1)
    stub = cluster.queen_stub(queen)
    call = stub.Infer(infer(max_tokens=1000))
    first = await call.read()
    assert isinstance(first, common_pb2.InferChunk) and first.index == 0
    call.cancel()

    async def idle_again() -> bool:
        models = await stub.ListModels(queen_pb2.ListModelsRequest())
        return models.models[0].idle == 1

    await wait_until(idle_again, timeout=5)
    assert tokens_in(await collect(stub, infer(max_tokens=2))) == 2


async def test_hive_sigterm_stops_its_workers_and_leaves_the_queen(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", ECHO2)
    workers = await cluster.wait_workers(queen, "demo", 2)
    pids = [w.pid for w in workers]
    assert all(psutil.pid_exists(p) for p in pids)

    hive.signal(signal.SIGTERM)
    assert hive.wait(10) == 0
    for pid in pids:
        assert not psutil.pid_exists(pid), f"worker {pid} outlived its hive"
    hives = await cluster.admin_stub(queen).ListHives(queen_pb2.ListHivesRequest())
    assert list(hives.hives) == []  # it said it was leaving; no waiting for a timeout
    assert [p.pid for p in cluster.marked_processes()] == [queen.pid]


async def test_silent_hive_becomes_unhealthy_and_is_not_routed_to(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", "model=demo,backend=echo")
    await cluster.wait_workers(queen, "demo", 1)
    admin = cluster.admin_stub(queen)
    hive.signal(signal.SIGSTOP)  # alive but silent, like a partitioned machine
    try:

        async def unhealthy() -> queen_pb2.HiveInfo | None:
            reply = await admin.GetHive(queen_pb2.GetHiveRequest(hive_id="h1"), timeout=1)
            return reply.hive if reply.hive.health == common_pb2.HIVE_HEALTH_UNHEALTHY else None

        info = await wait_until(unhealthy, timeout=5)
        assert "no heartbeat for" in info.health_reason
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(cluster.queen_stub(queen), infer(), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        hive.signal(signal.SIGCONT)
    await cluster.wait_workers(queen, "demo", 1)
    assert tokens_in(await collect(cluster.queen_stub(queen), infer())) == 8


async def test_admin_spawn_and_retire_through_the_queen(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1")
    admin = cluster.admin_stub(queen)

    async def hive_known() -> bool:
        return bool((await admin.ListHives(queen_pb2.ListHivesRequest())).hives)

    await wait_until(hive_known)
    reply = await admin.SpawnWorker(
        queen_pb2.QueenSpawnWorkerRequest(
            hive_id="h1",
            model="fresh",
            backend="echo",
            slots=2,
            wait_ready=True,
            backend_options={"load_delay": "0.2"},
        ),
        timeout=20,
    )
    worker = reply.worker
    assert worker.state == common_pb2.WORKER_STATE_IDLE and worker.pid and worker.slots_total == 2
    await cluster.wait_workers(queen, "fresh", 1)
    assert tokens_in(await collect(cluster.queen_stub(queen), infer(model="fresh"))) == 8

    retired = await admin.RetireWorker(
        queen_pb2.RetireWorkerRequest(worker_id=worker.id), timeout=20
    )
    assert retired.worker.id == worker.id
    assert not psutil.pid_exists(worker.pid)

    async def gone() -> bool:
        listed = await admin.ListWorkers(queen_pb2.ListWorkersRequest())
        return worker.id not in {w.id for w in listed.workers}

    await wait_until(gone)


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (
            queen_pb2.QueenSpawnWorkerRequest(hive_id="nope", model="m", backend="echo"),
            "NOT_FOUND",
            "h1",
        ),
        (
            queen_pb2.QueenSpawnWorkerRequest(hive_id="h1", model="m", backend="gpt5"),
            "INVALID_ARGUMENT",
            "echo",
        ),
        (
            queen_pb2.QueenSpawnWorkerRequest(hive_id="h1", model="", backend="echo"),
            "INVALID_ARGUMENT",
            "model",
        ),
        (
            queen_pb2.QueenSpawnWorkerRequest(
                hive_id="h1", model="m", backend="echo", backend_options={"speed": "9"}
            ),
            "INVALID_ARGUMENT",
            "token_delay",
        ),
        (
            queen_pb2.QueenSpawnWorkerRequest(
                hive_id="h1", model="m", backend="echo", backend_options={"token_delay": "-1"}
            ),
            "INVALID_ARGUMENT",
            ">= 0",
        ),
    ],
)
async def test_bad_admin_requests_get_precise_statuses(
    cluster: Cluster, request_: queen_pb2.QueenSpawnWorkerRequest, code: str, needle: str
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1")
    admin = cluster.admin_stub(queen)

    async def hive_known() -> bool:
        return bool((await admin.ListHives(queen_pb2.ListHivesRequest())).hives)

    await wait_until(hive_known)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.SpawnWorker(request_, timeout=10)
    assert err.value.code().name == code
    assert needle in (err.value.details() or "")
    for call, req in [
        (admin.GetWorker, queen_pb2.GetWorkerRequest(worker_id="w-missing")),
        (admin.RetireWorker, queen_pb2.RetireWorkerRequest(worker_id="w-missing")),
        (admin.GetHive, queen_pb2.GetHiveRequest(hive_id="nope")),
        (admin.ListWorkers, queen_pb2.ListWorkersRequest(hive_id="nope")),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(req, timeout=5)  # type: ignore[operator]
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_worker_enforces_its_own_slots(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo,backend=echo,token_delay=0.05")
    (worker,) = await cluster.wait_workers(queen, "demo", 1)
    direct = worker_pb2_grpc.WorkerStub(cluster.channel(worker.address))
    hold = direct.Infer(infer(max_tokens=100))
    await hold.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(direct, infer(max_tokens=1))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    hold.cancel()
