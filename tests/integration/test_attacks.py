"""An attacker who stole one hive's credential (hive `thief`) against a real cluster.

Everything the stolen token allows is acting as `thief`: it cannot speak for another hive,
claim another hive's workers, take over a running hive's id, advertise absurd capacity or
addresses off its host, and what the queen sends its fake hive and fake worker opens nothing
else. The queen and hive h1 are real processes; the attacker's hive and worker are servers
in this test that record every credential they receive.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from apiary.security import Security, derive_queen_token, derive_worker_token
from apiary.serving import Context
from cli.certs import add_named
from cli.certs import init as certs_init
from harness import Cluster, Proc
from harness import wait_until as eventually
from protos.v1 import (
    common_pb2,
    hive_pb2,
    hive_pb2_grpc,
    queen_pb2,
    queen_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

BAIT = "bait"


@dataclass
class Recorder:
    """What reached the attacker's servers: the bearer credential of every call."""

    credentials: list[str] = field(default_factory=list)

    def note(self, context: Context) -> None:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                self.credentials.append(str(value).removeprefix("Bearer "))


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def Infer(
        self, request: common_pb2.InferRequest, context: Context
    ) -> AsyncIterator[common_pb2.InferChunk]:
        self.recorder.note(context)
        yield common_pb2.InferChunk(
            text="stolen", finish_reason=common_pb2.FINISH_REASON_STOP, completion_tokens=1
        )


class FakeHive(hive_pb2_grpc.HiveServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def ListProcesses(
        self, request: hive_pb2.ListProcessesRequest, context: Context
    ) -> hive_pb2.ListProcessesResponse:
        self.recorder.note(context)
        return hive_pb2.ListProcessesResponse()


@dataclass
class Attacker:
    """The thief's credential, its fake hive and worker, and a heartbeat it keeps sending."""

    token: str
    # Tokens the attacker does not have, for the cases that assume they were stolen too.
    h1_token: str
    clients: dict[str, str]
    registry: queen_pb2_grpc.QueenRegistryAsyncStub
    recorder: Recorder
    hive_address: str
    worker_address: str
    beating: asyncio.Task[None] | None = None

    def beat(self, *records: common_pb2.WorkerRecord, **fields: Any) -> queen_pb2.HiveHeartbeat:
        base = {"hive_id": "thief", "address": self.hive_address, "instance": "thief-1"}
        return queen_pb2.HiveHeartbeat(**{**base, **fields}, workers=records)

    def bait_worker(self, **fields: Any) -> common_pb2.WorkerRecord:
        base = {
            "id": "w-bait",
            "hive_id": "thief",
            "model": BAIT,
            "backend": "echo",
            "state": common_pb2.WORKER_STATE_IDLE,
            "slots_total": 1,
            "address": self.worker_address,
        }
        return common_pb2.WorkerRecord(**{**base, **fields})

    async def keep_beating(self, interval: float) -> None:
        while True:
            await self.registry.Heartbeat(self.beat(self.bait_worker()), timeout=2)
            await asyncio.sleep(interval / 2)


async def code_and_details(call: Any) -> tuple[grpc.StatusCode | None, str]:
    try:
        result = await call
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return None, ""


@pytest.fixture
async def setting(cluster: Cluster, tmp_path: Path) -> AsyncIterator[tuple[Proc, Proc, Attacker]]:
    certs = tmp_path / "certs"
    certs_init(certs, [("queen", []), ("h1", []), ("thief", [])])
    add_named(certs, "clients", "other")
    tokens = json.loads((certs / "tokens.json").read_text())
    cluster.token = tokens["admin"]
    queen = cluster.start_queen(0, "--tokens-file", str(certs / "tokens.json"))
    hive = cluster.start_hive(
        queen, "h1", "model=demo,count=2", extra=("--tokens-file", str(certs / "h1.tokens.json"))
    )
    await cluster.wait_workers(queen, "demo", 2)
    recorder = Recorder()
    server = grpc.aio.server()
    # The fakes implement only what the queen calls; the rest answers UNIMPLEMENTED.
    worker_pb2_grpc.add_WorkerServicer_to_server(FakeWorker(recorder), server)  # type: ignore[abstract]
    hive_pb2_grpc.add_HiveServicer_to_server(FakeHive(recorder), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    token = tokens["hives"]["thief"]
    channel = Security().aio_channel(queen.address, token)
    attacker = Attacker(
        token,
        tokens["hives"]["h1"],
        tokens["clients"],
        queen_pb2_grpc.QueenRegistryStub(channel),
        recorder,
        hive_address=f"127.0.0.1:{port}",
        worker_address=f"127.0.0.1:{port}",
    )
    try:
        yield queen, hive, attacker
    finally:
        if attacker.beating is not None:
            attacker.beating.cancel()
        await channel.close(None)
        await server.stop(0)


async def test_a_stolen_hive_token_speaks_only_for_its_own_hive(
    cluster: Cluster, setting: tuple[Proc, Proc, Attacker]
) -> None:
    queen, _, attacker = setting
    admin = cluster.admin_stub(queen)
    h1_workers = {w.id: w.address for w in await cluster.wait_workers(queen, "demo", 2)}
    victim = next(iter(h1_workers))

    # As another hive: refused, naming whose token it is.
    code, details = await code_and_details(attacker.registry.Heartbeat(attacker.beat(hive_id="h1")))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "belongs to hive thief" in details
    # Absurd capacity: refused as a whole, naming the field.
    code, details = await code_and_details(
        attacker.registry.Heartbeat(attacker.beat(attacker.bait_worker(slots_total=1000)))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "slots_total 1000" in details
    # Another hive's worker ids, and an address off its own host: those records refused,
    # the rest applied.
    claimed = attacker.bait_worker(id=victim, model="demo", slots_total=8)
    elsewhere = attacker.bait_worker(id="w-far", address="10.66.0.1:9000")
    beat = attacker.beat(claimed, elsewhere, attacker.bait_worker())
    assert await code_and_details(attacker.registry.Heartbeat(beat)) == (None, "")
    listed = {w.id: w for w in (await admin.ListWorkers(queen_pb2.ListWorkersRequest())).workers}
    assert listed[victim].hive_id == "h1" and listed[victim].address == h1_workers[victim]
    assert "w-far" not in listed and listed["w-bait"].hive_id == "thief"
    # A second running process with a hive's id, even with that hive's own token.
    h1 = (await admin.GetHive(queen_pb2.GetHiveRequest(hive_id="h1"))).hive
    as_h1 = queen_pb2_grpc.QueenRegistryStub(cluster.channel(queen.address, attacker.h1_token))
    twin = attacker.beat(hive_id="h1", instance="twin", address="127.0.0.1:1")
    code, details = await code_and_details(as_h1.Heartbeat(twin))
    assert code == grpc.StatusCode.ALREADY_EXISTS and h1.address in details
    # Beating far faster than the interval: told to slow down.
    codes = [
        (await code_and_details(attacker.registry.Heartbeat(attacker.beat())))[0] for _ in range(40)
    ]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes


async def test_clients_hold_leases_as_themselves(
    cluster: Cluster, setting: tuple[Proc, Proc, Attacker]
) -> None:
    queen, _, attacker = setting
    shop = queen_pb2_grpc.QueenStub(cluster.channel(queen.address, attacker.clients["client"]))
    other = queen_pb2_grpc.QueenStub(cluster.channel(queen.address, attacker.clients["other"]))
    code, details = await code_and_details(
        shop.Lease(queen_pb2.LeaseRequest(model="demo", ttl_seconds=3600))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-lease-ttl" in details
    lease = await shop.Lease(queen_pb2.LeaseRequest(model="demo", ttl_seconds=30))
    release = queen_pb2.ReleaseLeaseRequest(lease_id=lease.lease_id)
    code, _ = await code_and_details(other.ReleaseLease(release))
    assert code == grpc.StatusCode.NOT_FOUND  # someone else's lease id names nothing
    assert await code_and_details(shop.ReleaseLease(release)) == (None, "")


async def test_what_the_queen_sends_an_attackers_servers_opens_nothing_else(
    cluster: Cluster, setting: tuple[Proc, Proc, Attacker]
) -> None:
    queen, hive, attacker = setting
    attacker.beating = asyncio.create_task(attacker.keep_beating(cluster.heartbeat_interval))
    admin = cluster.admin_stub(queen)

    async def bait_routable() -> bool:
        models = (await cluster.queen_stub(queen).ListModels(queen_pb2.ListModelsRequest())).models
        return any(m.name == BAIT and m.idle for m in models)

    await eventually(bait_routable, timeout=10)
    request = common_pb2.InferRequest(model=BAIT, prompt="my secret prompt", max_tokens=2)
    chunks = [c async for c in cluster.queen_stub(queen).Infer(request, timeout=10)]
    assert chunks[0].text == "stolen"  # the thief serves its own model, as any hive may
    await admin.ListProcesses(queen_pb2.HiveRequest(hive_id="thief"), timeout=10)
    to_worker, to_hive = attacker.recorder.credentials
    assert to_worker == derive_worker_token(attacker.token, "w-bait")
    assert to_hive == derive_queen_token(attacker.token)
    assert cluster.token not in attacker.recorder.credentials  # the admin token stays home

    # Neither opens anything at h1: not its hive, not its workers.
    for credential in (to_worker, to_hive, attacker.token):
        h1 = hive_pb2_grpc.HiveStub(cluster.channel(hive.address, credential))
        code, _ = await code_and_details(h1.ListWorkers(hive_pb2.ListHiveWorkersRequest()))
        assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        for worker in await cluster.wait_workers(queen, "demo", 2):
            stub = worker_pb2_grpc.WorkerStub(cluster.channel(worker.address, credential))
            code, details = await code_and_details(stub.GetStatus(worker_pb2.GetStatusRequest()))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            infer = common_pb2.InferRequest(model="demo", prompt="x", max_tokens=1)
            code, details = await code_and_details(_drain(stub.Infer(infer)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert worker.id not in details and "demo" not in details  # it learns nothing


async def _drain(call: Any) -> None:
    async for _ in call:
        pass
