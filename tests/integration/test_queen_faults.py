"""The queen's lifecycle and faults with real processes: it drains on SIGTERM (streams in
flight finish, new requests are told it is shutting down, and what its grace cannot wait for
is ended and recorded so), starts on a corrupt history, keeps serving on a full disk (a real
tmpfs) and records again once there is room, and makes no request wait longer than --max-wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from harness import Cluster, Proc, stays_true, wait_until
from protos.v1 import common_pb2, queen_pb2
from queen.server import QueenConfig, create_server
from tests.streams import tokens_in

Status = queen_pb2.RequestStatus
SHUTTING_DOWN = "queen shutting down"


def own_hive_id() -> str:
    """A hive id no concurrent run on this machine uses (a hive adopts its id's workers)."""
    return f"qf-{uuid.uuid4().hex[:6]}"


def infer(tokens: int, reference: str) -> common_pb2.InferRequest:
    return common_pb2.InferRequest(
        model="demo", prompt="a b c", max_tokens=tokens, request_id=reference
    )


async def collect(stub: Any, request: common_pb2.InferRequest, timeout: float | None = 60) -> Any:
    return [c async for c in stub.Infer(request, timeout=timeout)]


async def read_all(call: Any, into: list[Any]) -> None:
    """The rest of a stream begun with read() (grpc.aio allows no iterator after that)."""
    while True:
        chunk = await call.read()
        if not isinstance(chunk, common_pb2.InferChunk):
            return
        into.append(chunk)


async def failure(awaitable: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and details the call ended with (it must fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await awaitable
    return err.value.code(), err.value.details() or ""


def log_events(proc: Proc, event: str) -> list[dict[str, Any]]:
    found = []
    for line in proc.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            found.append(entry)
    return found


async def records(cluster: Cluster, queen: Proc) -> dict[str, queen_pb2.RequestRecord]:
    """The queen's history, by the clients' references."""
    reply = await cluster.admin_stub(queen).ListRequests(queen_pb2.ListRequestsRequest(limit=1000))
    return {r.client_request_id: r for r in reply.requests}


async def stopped(queen: Proc, timeout: float) -> int:
    return await asyncio.to_thread(queen.wait, timeout)


async def test_a_stopping_queen_lets_streams_finish_and_refuses_new_requests(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, own_hive_id(), "model=demo,count=2,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 2)
    stub, admin = cluster.queen_stub(queen), cluster.admin_stub(queen)
    health = health_pb2_grpc.HealthStub(cluster.channel(queen.address))
    call = stub.Infer(infer(60, "long"), timeout=60)  # about 3 s of tokens
    chunks: list[Any] = [await call.read()]
    queen.signal(signal.SIGTERM)

    async def not_serving() -> bool:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        return bool(reply.status == health_pb2.HealthCheckResponse.NOT_SERVING)

    await wait_until(not_serving, 5)
    refused_code, refused = await failure(collect(stub, infer(5, "late")))
    assert refused_code == grpc.StatusCode.UNAVAILABLE
    assert refused.startswith(f"{SHUTTING_DOWN}: it takes no new requests; retry")
    lease_code, lease = await failure(stub.Lease(queen_pb2.LeaseRequest(model="demo"), timeout=5))
    assert lease_code == grpc.StatusCode.UNAVAILABLE and SHUTTING_DOWN in lease

    # Admin calls and heartbeats still work while the streams finish: the hive stays healthy
    # (3 intervals, 0.6 s, without a heartbeat would make it unhealthy).
    async def hive_healthy() -> bool:
        (hive,) = (await admin.ListHives(queen_pb2.ListHivesRequest(), timeout=1)).hives
        return hive.health == common_pb2.HIVE_HEALTH_HEALTHY

    await stays_true(hive_healthy, 1.0)
    await read_all(call, chunks)
    assert tokens_in(chunks) == 60 and chunks[-1].completion_tokens == 60
    assert await call.code() == grpc.StatusCode.OK
    assert await stopped(queen, 15) == 0
    queen = cluster.start_queen()
    history = await records(cluster, queen)
    assert set(history) == {"long"}  # the refused one was never accepted
    assert history["long"].status == Status.REQUEST_STATUS_COMPLETED
    assert history["long"].completion_tokens == 60


async def test_what_the_grace_cannot_wait_for_is_ended_and_recorded_so(cluster: Cluster) -> None:
    queen = cluster.start_queen(0, "--shutdown-grace", "3")
    cluster.start_hive(queen, own_hive_id(), "model=demo,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 1)
    stub = cluster.queen_stub(queen)
    running = stub.Infer(infer(1000, "running"), timeout=120)  # 50 s of tokens
    chunks: list[Any] = [await running.read()]
    waiting = asyncio.create_task(collect(stub, infer(5, "waiting")))

    async def queued() -> bool:
        (model,) = (await stub.ListModels(queen_pb2.ListModelsRequest(), timeout=1)).models
        return model.queued == 1

    await wait_until(queued)
    queen.signal(signal.SIGTERM)
    # The waiting request ends at once, not after the grace.
    ended_code, ended = await failure(asyncio.wait_for(waiting, 2.5))
    assert ended_code == grpc.StatusCode.UNAVAILABLE
    assert ended.startswith(
        f"{SHUTTING_DOWN}: the request was still waiting for a free worker and nothing was sent"
    )
    cut_code, cut = await failure(read_all(running, chunks))
    assert cut_code == grpc.StatusCode.UNAVAILABLE
    received = sum(1 for c in chunks if c.text)
    said = re.fullmatch(
        f"{SHUTTING_DOWN}: the stream was ended after (\\d+) token chunk\\(s\\) were "
        "delivered, when the queen's --shutdown-grace of 3 s ran out; retry against another "
        "queen, or once this one has restarted",
        cut,
    )
    assert said, cut
    # The queen counts a chunk once its write completed: one in the wire as the stream is cut
    # may be counted and lost, or arrive uncounted.
    assert abs(int(said[1]) - received) <= 1
    assert 10 <= received < 1000
    assert await stopped(queen, 15) == 0
    queen = cluster.start_queen()
    history = await records(cluster, queen)
    assert history["running"].status == Status.REQUEST_STATUS_FAILED
    assert history["running"].error == f"UNAVAILABLE: {cut}"
    # Tokens as written by the queen: those received, and any of a chunk lost in the cut.
    recorded = history["running"].completion_tokens
    assert abs(recorded - tokens_in(chunks)) <= 16
    assert history["waiting"].status == Status.REQUEST_STATUS_FAILED
    assert history["waiting"].error == f"UNAVAILABLE: {ended}"


async def test_a_second_signal_ends_the_grace_at_once(cluster: Cluster) -> None:
    queen = cluster.start_queen(0, "--shutdown-grace", "60")
    cluster.start_hive(queen, own_hive_id(), "model=demo,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 1)
    running = cluster.queen_stub(queen).Infer(infer(1000, "running"), timeout=120)
    await running.read()
    queen.signal(signal.SIGTERM)
    await wait_until(lambda: log_events(queen, "queen draining: no new requests"), 5)
    queen.signal(signal.SIGTERM)
    cut_code, cut = await failure(running.read())
    assert cut_code == grpc.StatusCode.UNAVAILABLE and SHUTTING_DOWN in cut
    assert "--shutdown-grace of 60 s" in cut
    assert await stopped(queen, 10) == 0


async def test_stopping_a_queen_twice_stops_it_once(tmp_path: Path) -> None:
    queen = await create_server("127.0.0.1:0", QueenConfig(state_dir=tmp_path, shutdown_grace=5))
    first = asyncio.create_task(queen.stop(5))
    await asyncio.gather(first, queen.stop(5))
    await asyncio.wait_for(queen.stop(5), 1)  # done already: returns at once
    assert not (tmp_path / "history.sqlite3-wal").exists()  # the history was closed


async def test_a_corrupt_history_is_moved_aside_and_the_queen_serves(cluster: Cluster) -> None:
    state = cluster.tmp / "queen-state"
    state.mkdir()
    junk = b"not a database at all " * 500
    (state / "history.sqlite3").write_bytes(junk)
    (state / "history.sqlite3-wal").write_bytes(junk[:1000])
    queen = cluster.start_queen()
    cluster.start_hive(queen, own_hive_id(), "model=demo")
    await cluster.wait_workers(queen, "demo", 1)
    await collect(cluster.queen_stub(queen), infer(3, "after"))
    (moved,) = state.glob("history.sqlite3.corrupt-*[0-9]Z")
    assert moved.read_bytes() == junk
    assert Path(f"{moved}-wal").read_bytes() == junk[:1000]
    (said,) = log_events(queen, "request history unreadable: moved aside, a new one begins")
    assert said["level"] == "error"
    assert (said["path"], said["moved_to"]) == (str(state / "history.sqlite3"), str(moved))
    history = await records(cluster, queen)
    assert history["after"].status == Status.REQUEST_STATUS_COMPLETED


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[None]:
    """A real tmpfs at `path` (root only), unmounted however the test ends."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root and CAP_SYS_ADMIN needed): {mounted.stderr}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Append to the file until the file system is full."""
    block = b"\0" * 65536
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        with contextlib.suppress(OSError):  # the last few bytes
            while True:
                f.write(b"\0" * 512)


def scrape(queen: Proc) -> dict[str, float]:
    (served,) = log_events(queen, "metrics served")
    text = urllib.request.urlopen(served["url"], timeout=5).read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def test_on_a_full_disk_streams_complete_and_history_resumes_with_room(
    cluster: Cluster,
) -> None:
    state = cluster.tmp / "queen-state"
    with small_tmpfs(state, "1m"):
        queen = cluster.start_queen(0, "--metrics-port", "0")
        try:
            await full_disk_streams(cluster, queen, state)
        finally:
            queen.signal(signal.SIGTERM)
            await stopped(queen, 15)


async def full_disk_streams(cluster: Cluster, queen: Proc, state: Path) -> None:
    cluster.start_hive(queen, own_hive_id(), "model=demo,count=4")
    await cluster.wait_workers(queen, "demo", 4)
    stub, admin = cluster.queen_stub(queen), cluster.admin_stub(queen)
    await collect(stub, infer(5, "before"))
    fill(state / "filler")
    streams = await asyncio.gather(*(collect(stub, infer(20, f"full-{i}")) for i in range(40)))
    assert [tokens_in(s) for s in streams] == [20] * 40  # every one, in full

    async def degraded() -> queen_pb2.QueenStatus | None:
        """SQLite gives space back when a new connection checkpoints its WAL after a failed
        write, and some writes fit again: take that space too, and probe."""
        fill(state / "filler")
        await collect(stub, infer(5, f"probe-{uuid.uuid4().hex[:4]}"))
        status = (await admin.ListHives(queen_pb2.ListHivesRequest())).queen
        return status if status.degraded else None

    queen_status = await wait_until(degraded, 20, interval=0.05)
    assert queen_status.history_rows_dropped > 0
    # SQLite says so in its words: "database or disk is full", or "disk I/O error" when the
    # WAL's shared memory cannot grow.
    assert re.search(
        r"history .* (can|could) ?not be written: (database or disk is full|disk I/O error)",
        queen_status.problems[0],
    )
    metrics = await asyncio.to_thread(scrape, queen)
    assert metrics["apiary_history_rows_dropped_total"] >= queen_status.history_rows_dropped
    said = log_events(
        queen, "request history cannot be written; its rows are dropped, requests go on"
    )
    assert len(said) == 1  # once a minute, not once a row
    (state / "filler").unlink()

    async def recorded_again() -> bool:
        await collect(stub, infer(5, f"after-{uuid.uuid4().hex[:4]}"))
        history = await records(cluster, queen)
        return any(
            ref.startswith("after-") and r.status == Status.REQUEST_STATUS_COMPLETED
            for ref, r in history.items()
        )

    await wait_until(recorded_again, 10, interval=0.2)
    assert "before" in await records(cluster, queen)


async def test_a_request_without_a_deadline_waits_at_most_max_wait(cluster: Cluster) -> None:
    queen = cluster.start_queen(0, "--max-wait", "1")
    cluster.start_hive(queen, own_hive_id(), "model=demo,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 1)
    stub = cluster.queen_stub(queen)
    busy = asyncio.create_task(collect(stub, infer(100, "busy")))  # 5 s of tokens

    async def running() -> bool:
        (model,) = (await stub.ListModels(queen_pb2.ListModelsRequest(), timeout=1)).models
        return model.busy == 1

    await wait_until(running)
    waited_code, waited = await failure(collect(stub, infer(5, "no-deadline"), timeout=None))
    assert waited_code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert waited.startswith("no free worker of model 'demo' within the queen's --max-wait of 1 s")
    lease_code, lease = await failure(stub.Lease(queen_pb2.LeaseRequest(model="demo")))
    assert lease_code == grpc.StatusCode.DEADLINE_EXCEEDED and "--max-wait" in lease
    history = await records(cluster, queen)
    assert history["no-deadline"].status == Status.REQUEST_STATUS_DEADLINE_EXCEEDED
    await busy
