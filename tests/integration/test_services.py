"""Each server's standard services (health, reflection) and the Hive and Worker RPCs directly."""

from __future__ import annotations

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness import Cluster
from protos.v1 import common_pb2, hive_pb2, worker_pb2, worker_pb2_grpc


async def list_services(cluster: Cluster, address: str) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(cluster.channel(address))
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    async for reply in call:
        return {s.name for s in reply.list_services_response.service}
    return set()


async def serving(cluster: Cluster, address: str, service: str = "") -> bool:
    stub = health_pb2_grpc.HealthStub(cluster.channel(address))
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def test_every_tier_serves_health_and_reflection(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", "model=demo,backend=echo")
    (worker,) = await cluster.wait_workers(queen, "demo", 1)
    common = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    expected = {
        queen.address: {"apiary.v1.Queen", "apiary.v1.QueenRegistry", "apiary.v1.QueenAdmin"},
        hive.address: {"apiary.v1.Hive"},
        worker.address: {"apiary.v1.Worker"},
    }
    for address, services in expected.items():
        assert await list_services(cluster, address) == services | common
        for service in ["", *services]:
            assert await serving(cluster, address, service)


async def test_hive_rpcs(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1")
    stub = cluster.hive_stub(hive)

    spawned = await stub.SpawnWorker(
        hive_pb2.SpawnWorkerRequest(
            model="m", backend="echo", backend_options={"load_delay": "0.3"}
        )
    )
    assert spawned.worker.state == common_pb2.WORKER_STATE_LOADING
    assert spawned.worker.pid and psutil.pid_exists(spawned.worker.pid)
    listed = await stub.ListWorkers(hive_pb2.ListHiveWorkersRequest())
    assert [w.id for w in listed.workers] == [spawned.worker.id]
    await cluster.wait_workers(queen, "m", 1)
    got = await stub.GetWorker(hive_pb2.GetHiveWorkerRequest(worker_id=spawned.worker.id))
    assert got.worker.state == common_pb2.WORKER_STATE_IDLE and got.worker.address

    status = await worker_pb2_grpc.WorkerStub(cluster.channel(got.worker.address)).GetStatus(
        worker_pb2.GetStatusRequest()
    )
    assert (status.worker.id, status.worker.model, status.worker.slots_available) == (
        spawned.worker.id,
        "m",
        1,
    )

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetWorker(hive_pb2.GetHiveWorkerRequest(worker_id="w-nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert spawned.worker.id in (err.value.details() or "")  # names what exists
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReportReady(hive_pb2.ReportReadyRequest(worker_id="w-nope", address="x:1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        # A second ready report (or a forged one) for a worker that is already up.
        await stub.ReportReady(
            hive_pb2.ReportReadyRequest(worker_id=spawned.worker.id, address="x:1")
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StopWorker(
            hive_pb2.StopWorkerRequest(worker_id=spawned.worker.id, grace_seconds=-1)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    stopped = await stub.StopWorker(
        hive_pb2.StopWorkerRequest(worker_id=spawned.worker.id, force=True)
    )
    assert stopped.worker.id == spawned.worker.id
    assert not psutil.pid_exists(spawned.worker.pid)
    assert list((await stub.ListWorkers(hive_pb2.ListHiveWorkersRequest())).workers) == []
