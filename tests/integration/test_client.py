"""apiary.client against real processes: streams, models, leases, admin calls, deadlines,
credentials, failover between queens, and waiting for a restarting queen."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from uuid import uuid4

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apiary.client import AsyncClient, Client, infer_request
from cli.certs import init as certs_init
from harness import Cluster, Proc, stays_true, wait_until
from protos.v1 import common_pb2, queen_pb2

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello bees"}]


def hive_id() -> str:
    """A hive id of this file's own: others run tests on the same machine at the same time."""
    return f"cl-{uuid4().hex[:6]}"


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def text_of(
    stream: AsyncIterator[common_pb2.InferChunk],
) -> tuple[str, common_pb2.InferChunk]:
    chunks = [chunk async for chunk in stream]
    return "".join(chunk.text for chunk in chunks), chunks[-1]


async def failure(awaitable: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The error the call ends with (it must fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await awaitable
    return raised.value


@pytest.fixture
async def live(cluster: Cluster) -> tuple[Proc, str]:
    """A queen and a hive with two echo workers of `demo`; (queen, hive id)."""
    queen, hive = cluster.start_queen(), hive_id()
    cluster.start_hive(queen, hive, "model=demo,count=2")
    await cluster.wait_workers(queen, "demo", 2)
    return queen, hive


async def test_async_streams_of_a_prompt_and_a_chat(live: tuple[Proc, str]) -> None:
    queen, _ = live
    async with AsyncClient(queen.address) as client:
        text, last = await text_of(client.infer("demo", "buzz buzz honey", max_tokens=4))
        assert text == "buzz buzz honey buzz"
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert last.completion_tokens == 4
        # Echo renders a chat as 'role: content' lines then 'assistant:' (7 words) and
        # streams back the last user message.
        text, last = await text_of(client.chat("demo", CHAT, max_tokens=3, request_id="c1"))
        assert text == "hello bees hello" and last.prompt_tokens == 7
        assert last.request_id == "c1"
        (model,) = await client.list_models()
        assert model.name == "demo" and model.idle == 2


async def test_sync_streams_and_calls(live: tuple[Proc, str]) -> None:
    queen, hive = live

    def use() -> tuple[str, str, list[str], list[str]]:
        with Client(queen.address) as client:
            prompt = "".join(c.text for c in client.infer("demo", "a b", max_tokens=3))
            chat = "".join(c.text for c in client.chat("demo", CHAT, max_tokens=2))
            models = [m.name for m in client.list_models()]
            hives = [h.id for h in client.admin.list_hives().hives]
            # Leaving a stream early ends its call; the client goes on working.
            for _ in client.infer("demo", "x y z", max_tokens=50):
                break
            return prompt, chat, models, hives

    assert await asyncio.to_thread(use) == ("a b a", "hello bees", ["demo"], [hive])


async def test_a_lease_and_a_direct_call_to_the_worker(live: tuple[Proc, str]) -> None:
    queen, _ = live
    async with AsyncClient(queen.address) as client:
        lease = await client.lease("demo", ttl_seconds=10)
        assert lease.lease_id and lease.address
        request = infer_request("demo", "straight to the worker", max_tokens=4)
        text, _ = await text_of(client.infer_direct(lease, request))
        assert text == "straight to the worker"
        unused = await client.lease("demo")
        await client.release_lease(unused)
        await failure(text_of(client.infer_direct(lease, request)))  # a lease serves once

    def sync_direct() -> str:
        with Client(queen.address) as blocking:
            leased = blocking.lease("demo")
            direct = infer_request("demo", "sync direct", max_tokens=2)
            return "".join(c.text for c in blocking.infer_direct(leased, direct))

    assert await asyncio.to_thread(sync_direct) == "sync direct"


async def test_admin_calls(live: tuple[Proc, str]) -> None:
    queen, hive = live
    async with AsyncClient(queen.address) as client:
        admin = client.admin
        listed = await admin.list_hives()
        assert [h.id for h in listed.hives] == [hive] and listed.queen.started_at.seconds
        assert len((await admin.get_hive(hive)).workers) == 2
        workers = await admin.list_workers(hive_id=hive, state=common_pb2.WORKER_STATE_IDLE)
        assert len(workers) == 2
        worker = await admin.get_worker(workers[0].id)
        assert worker.pid == workers[0].pid
        assert (await admin.drain_worker(worker.id)).drained
        assert not (await admin.drain_worker(worker.id, undrain=True)).drained
        assert (await admin.drain_hive(hive)).drained
        assert not (await admin.drain_hive(hive, undrain=True)).drained
        backends = await admin.list_backends(hive_id=hive)
        assert "echo" in [b.name for b in backends]
        assert (await admin.get_backend("echo")).available  # the only hive: no --hive needed
        assert [p.worker_id for p in await admin.list_processes()]
        assert await admin.list_catalog() == []
        missing = await failure(admin.get_worker("w-nope"))
        assert missing.code() == grpc.StatusCode.NOT_FOUND and "w-nope" in (missing.details() or "")

        seen: list[str] = []

        async def watch() -> None:
            kinds = [queen_pb2.EVENT_KIND_REQUEST_COMPLETED]
            async for event in admin.watch_events(kinds=kinds, timeout=20):
                seen.append(event.client_request_id)
                if event.client_request_id == "watched":
                    return

        watcher = asyncio.create_task(watch())

        async def subscribed() -> bool:
            """The watch has begun once it sees a probe request complete."""
            await text_of(client.infer("demo", "probe", max_tokens=1))
            return bool(seen)

        await wait_until(subscribed, timeout=10, interval=0.1)
        await text_of(client.infer("demo", "seen", max_tokens=1, request_id="watched"))
        await asyncio.wait_for(watcher, 10)
        records = await admin.list_requests(model="demo", limit=10)
        assert "watched" in [r.client_request_id for r in records]


async def test_spawn_and_retire_a_worker(live: tuple[Proc, str]) -> None:
    queen, hive = live
    async with AsyncClient(queen.address) as client:
        spawned = await client.admin.spawn_worker(
            "demo", hive_id=hive, backend="echo", tags=["extra"], timeout=60
        )
        assert spawned.state in (common_pb2.WORKER_STATE_IDLE, common_pb2.WORKER_STATE_BUSY)
        assert list(spawned.tags) == ["extra"]
        retired = await client.admin.retire_worker(spawned.id, timeout=60)
        assert retired.id == spawned.id

        async def back_to_two() -> bool:
            return len(await client.admin.list_workers(hive_id=hive)) == 2

        await wait_until(back_to_two, timeout=10)


async def test_a_deadline_that_passes_ends_the_stream(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, hive_id(), "model=slow,count=1,token_delay=0.2")
    await cluster.wait_workers(queen, "slow", 1)
    async with AsyncClient(queen.address, timeout=30) as client:
        started = time.monotonic()
        received: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for chunk in client.infer("slow", "one two three", max_tokens=50, timeout=1):
                received.append(chunk.text)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.9 < time.monotonic() - started < 5 and 1 <= len(received) < 10


async def test_a_dead_queen_first_then_the_live_one(live: tuple[Proc, str]) -> None:
    queen, _ = live
    dead = f"127.0.0.1:{free_port()}"
    async with AsyncClient(f"{dead},{queen.address}", timeout=10) as client:
        text, _ = await text_of(client.infer("demo", "after a dead one", max_tokens=4))
        assert text == "after a dead one"
        assert [m.name for m in await client.list_models()] == ["demo"]

    def sync_failover() -> str:
        with Client([dead, queen.address], timeout=10) as blocking:
            return "".join(c.text for c in blocking.infer("demo", "sync too", max_tokens=2))

    assert await asyncio.to_thread(sync_failover) == "sync too"


async def test_a_stopping_queen_sends_new_requests_to_the_next(cluster: Cluster) -> None:
    first, second = cluster.start_queen(), cluster.start_queen(state="second-queen")
    cluster.start_hive(first, hive_id(), "model=demo,count=1,token_delay=0.05")
    cluster.start_hive(second, hive_id(), "model=demo,count=1")
    await cluster.wait_workers(first, "demo", 1)
    await cluster.wait_workers(second, "demo", 1)
    async with AsyncClient(first.address, timeout=30) as only_first:
        # A stream of about 3 s keeps the first queen in its shutdown grace, refusing new
        # requests with "queen shutting down".
        long = only_first.infer("demo", "long one", max_tokens=60)
        await anext(long)
        first.signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(cluster.channel(first.address))

        async def not_serving() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return bool(reply.status == health_pb2.HealthCheckResponse.NOT_SERVING)

        await wait_until(not_serving, 5)
        async with AsyncClient(first.address, wait_for_ready=False) as impatient:
            refused = await failure(text_of(impatient.infer("demo", "refused", max_tokens=1)))
        assert (refused.details() or "").startswith("queen shutting down")
        async with AsyncClient([first.address, second.address], timeout=10) as both:
            text, _ = await text_of(both.infer("demo", "served by the second", max_tokens=4))
            assert text == "served by the second"
        rest = [chunk async for chunk in long]
        assert rest[-1].completion_tokens == 60  # the first queen's stream was not disturbed


async def test_a_call_waits_for_a_restarting_queen(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, hive_id(), "model=demo,count=1")
    await cluster.wait_workers(queen, "demo", 1)
    queen.signal(signal.SIGTERM)
    assert await asyncio.to_thread(queen.wait, 15) == 0
    async with AsyncClient(queen.address, timeout=30) as client:
        started = time.monotonic()
        call = asyncio.create_task(text_of(client.infer("demo", "welcome back", max_tokens=2)))
        await stays_true(lambda: not call.done(), 0.5)  # no queen: it waits, it does not fail
        cluster.start_queen(queen.port)
        text, _ = await asyncio.wait_for(call, 30)
        assert text == "welcome back" and time.monotonic() - started < 30

    def sync_call_while_restarting() -> list[str]:
        with Client(queen.address, timeout=30) as blocking:
            return [m.name for m in blocking.list_models()]

    assert await asyncio.to_thread(sync_call_while_restarting) == ["demo"]


async def test_without_a_queen_a_call_fails_at_its_deadline() -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with AsyncClient(dead, timeout=1.5) as client:
        started = time.monotonic()
        error = await failure(client.list_models())
        assert 1.4 < time.monotonic() - started < 4
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        stream = await failure(text_of(client.infer("demo", "x", timeout=0.5)))
        assert stream.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    async with AsyncClient(dead, wait_for_ready=False) as impatient:
        started = time.monotonic()
        error = await failure(impatient.list_models())
        assert time.monotonic() - started < 1 and error.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed to connect" in (error.details() or "")

    def blocking_call() -> grpc.StatusCode:
        with Client(dead, timeout=1) as blocking:
            try:
                blocking.list_models()
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        raise AssertionError("a call without a queen succeeded")

    assert await asyncio.to_thread(blocking_call) in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


async def test_tokens_and_tls(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = tmp_path / "certs"
    certs_init(certs, [("queen", ["127.0.0.1"]), ("hive", ["127.0.0.1"])])
    tokens = json.loads((certs / "tokens.json").read_text())
    queen = cluster.start_queen(
        0, "--tokens-file", str(certs / "tokens.json"),
        "--tls-cert", str(certs / "queen.pem"), "--tls-key", str(certs / "queen.key"),
        "--tls-client-ca", str(certs / "ca.pem"),
    )  # fmt: skip
    ca, cert, key = (str(certs / name) for name in ("ca.pem", "client.pem", "client.key"))

    def client(token: str | None) -> AsyncClient:
        return AsyncClient(queen.address, token=token, tls_ca=ca, tls_cert=cert, tls_key=key)

    monkeypatch.setenv("APIARY_TOKEN", tokens["admin"])
    admin = client(None)  # the token is read now, from the environment
    monkeypatch.delenv("APIARY_TOKEN")
    async with admin:
        assert (await admin.admin.list_hives()).hives == []
    async with client(tokens["clients"]["client"]) as application:
        assert await application.list_models() == []
        denied = await failure(application.admin.list_hives())
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    async with client("") as anonymous:
        unknown = await failure(anonymous.list_models())
        assert unknown.code() == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncClient(
        queen.address, token=tokens["admin"], tls_ca=ca, wait_for_ready=False
    ) as bare:
        handshake = await failure(bare.list_models())  # mTLS: refused without a certificate
        assert handshake.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_hive_beats_to_two_queens_and_a_stream_resumes_when_its_queen_is_killed(
    cluster: Cluster,
) -> None:
    first = cluster.start_queen()
    second = cluster.start_queen(state="second-queen")
    both = f"{first.address},{second.address}"
    cluster.start_hive(both, hive_id(), "model=demo,count=2,token_delay=0.02")
    for queen in (first, second):  # each queen knows the whole cluster and routes on its own
        await cluster.wait_workers(queen, "demo", 2)
    async with AsyncClient([first.address, second.address], timeout=30) as client:
        whole, _ = await text_of(client.infer("demo", "one two three", max_tokens=60))
        stream = client.infer("demo", "one two three", max_tokens=60)
        chunks = [await anext(stream) for _ in range(5)]
        first.signal(signal.SIGKILL)  # the queen relaying it: the first in the client's order
        chunks += [chunk async for chunk in stream]
    # One stream to the caller: no gap, no repeat, consecutive indexes, usage for the whole.
    assert "".join(c.text for c in chunks) == whole
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].completion_tokens == 60
    listed = await cluster.admin_stub(second).ListRequests(queen_pb2.ListRequestsRequest())
    resumed = [r for r in listed.requests if r.status == queen_pb2.REQUEST_STATUS_COMPLETED]
    assert resumed and all(r.completion_tokens == 60 for r in resumed)  # usage for the whole


def test_a_second_queen_on_the_same_state_dir_refuses_to_start(cluster: Cluster) -> None:
    cluster.start_queen()
    with pytest.raises(RuntimeError) as refused:
        cluster.start_queen()  # the cluster's one queen state dir
    assert "another queen (pid" in str(refused.value) and "its own --state-dir" in str(
        refused.value
    )


async def test_requests_of_several_queens_are_listed_as_one_history(cluster: Cluster) -> None:
    first, second = cluster.start_queen(), cluster.start_queen(state="second-queen")
    cluster.start_hive(f"{first.address},{second.address}", hive_id(), "model=demo,count=2")
    for queen, reference in ((first, "via-first"), (second, "via-second")):
        await cluster.wait_workers(queen, "demo", 2)
        async with AsyncClient(queen.address) as one:
            await text_of(one.send(infer_request("demo", "hi", max_tokens=2, request_id=reference)))
    async with AsyncClient([first.address, second.address]) as both:
        merged = await both.admin.list_requests()
        assert [r.client_request_id for r in merged] == ["via-second", "via-first"]  # newest first
        assert len(await both.admin.list_requests(limit=1)) == 1
        second.signal(signal.SIGKILL)
        assert await asyncio.to_thread(second.wait, 10) is not None
        # A queen that cannot be reached is left out while another answers.
        left = await both.admin.list_requests()
        assert [r.client_request_id for r in left] == ["via-first"]


async def test_a_drain_sent_to_one_queen_holds_at_every_queen_and_across_restarts(
    cluster: Cluster,
) -> None:
    first, second = cluster.start_queen(), cluster.start_queen(state="second-queen")
    cluster.start_hive(f"{first.address},{second.address}", hive_id(), "model=demo,count=2")
    (kept, drained) = sorted(w.id for w in await cluster.wait_workers(second, "demo", 2))
    await cluster.wait_workers(first, "demo", 2)
    async with AsyncClient(first.address) as via_first:
        await via_first.admin.drain_worker(drained)

    async def second_knows(expected: bool) -> bool:
        async with AsyncClient(second.address) as via_second:
            worker = await via_second.admin.get_worker(drained)
            return worker.drained is expected

    await wait_until(lambda: second_knows(True), 5)  # the hive told the other queen
    async with AsyncClient(second.address) as via_second:
        served = {
            (await text_of(via_second.infer("demo", "x", max_tokens=1)))[1].worker_id
            for _ in range(6)
        }
    assert served == {kept}  # the second queen routes around it too
    second.signal(signal.SIGKILL)
    await asyncio.to_thread(second.wait, 10)
    second = cluster.start_queen(second.port, state="second-queen")
    await wait_until(lambda: second_knows(True), 10)  # a restarted queen learns it again
    async with AsyncClient(second.address) as via_second:
        await via_second.admin.drain_worker(drained, undrain=True)
    async with AsyncClient(first.address) as via_first:
        await wait_until(lambda: undrained(via_first, drained), 5)


async def undrained(client: AsyncClient, worker_id: str) -> bool:
    return not (await client.admin.get_worker(worker_id)).drained
