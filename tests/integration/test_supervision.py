"""The hive as the owner of real processes: crashes, hangs, restarts, idleness, re-adoption."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import grpc
import psutil
import pytest

from apiary.protoutil import READY_STATES
from harness import Cluster, Proc, stays_true
from harness import wait_until as eventually
from protos.v1 import common_pb2, hive_pb2, queen_pb2
from tests.streams import tokens_in

FAST = ("--restart-backoff", "0.1", "--term-grace", "0.5")


async def collect(
    stub: Any, model: str = "demo", tokens: int = 4, timeout: float = 20
) -> list[Any]:
    request = common_pb2.InferRequest(model=model, prompt="a b c", max_tokens=tokens)
    return [c async for c in stub.Infer(request, timeout=timeout)]


async def hive_workers(cluster: Cluster, hive: Proc) -> list[common_pb2.WorkerRecord]:
    reply = await cluster.hive_stub(hive).ListWorkers(hive_pb2.ListHiveWorkersRequest(), timeout=2)
    return list(reply.workers)


async def wait_worker(
    cluster: Cluster, hive: Proc, check: Any, timeout: float = 15.0
) -> common_pb2.WorkerRecord:
    async def found() -> common_pb2.WorkerRecord | None:
        for w in await hive_workers(cluster, hive):
            if check(w):
                return w
        return None

    return await eventually(found, timeout)


async def test_worker_that_exits_at_once_is_restarted_then_stopped_as_a_crash_loop(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", "model=demo,fault_exit_on_load=3", extra=FAST)
    looped = await wait_worker(
        cluster, hive, lambda w: "crash loop" in w.failure_reason, timeout=30
    )
    assert looped.state == common_pb2.WORKER_STATE_FAILED
    assert looped.restart_count == 4  # 5 failures: the first start and 4 restarts
    assert looped.failure_reason.startswith("exited with code 3; crash loop: 5 failures in 300s")
    # Restarts stopped: it stays this way (a window of 10 restart backoffs).
    failed_for_good = (4, common_pb2.WORKER_STATE_FAILED, 0)

    async def unchanged() -> bool:
        (worker,) = await hive_workers(cluster, hive)
        return (worker.restart_count, worker.state, worker.pid) == failed_for_good

    await stays_true(unchanged, seconds=1.0)
    (still,) = await hive_workers(cluster, hive)
    # The queen shows the reason too.
    got = await cluster.admin_stub(queen).GetWorker(queen_pb2.GetWorkerRequest(worker_id=still.id))
    assert "crash loop" in got.worker.failure_reason
    info = await cluster.admin_stub(queen).GetHive(queen_pb2.GetHiveRequest(hive_id="h1"))
    assert (info.hive.stats.spawns, info.hive.stats.crashes, info.hive.stats.restarts) == (5, 5, 4)


async def test_worker_that_crashes_after_n_requests_comes_back_with_the_same_id(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", "model=demo,count=2,fault_crash_after=2", extra=FAST)
    workers = await cluster.wait_workers(queen, "demo", 2)
    stub = cluster.queen_stub(queen)
    # 4 requests: 2 per worker (LRU alternates), then the 5th finds its worker dying on it and
    # is retried on the other before any chunk was sent; none of them fails.
    for _ in range(5):
        assert tokens_in(await collect(stub)) == 4
    pids = {w.id: w.pid for w in workers}

    restarted = await wait_worker(
        cluster, hive, lambda w: w.restart_count == 1 and w.state == common_pb2.WORKER_STATE_IDLE
    )
    assert restarted.id in pids and restarted.pid != pids[restarted.id]
    assert not psutil.pid_exists(pids[restarted.id])
    await cluster.wait_workers(queen, "demo", 2)
    assert tokens_in(await collect(stub)) == 4


async def test_hung_worker_fails_health_checks_and_is_killed(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(
        queen, "h1", "model=demo,restart=never,fault_hang_after=0.5", extra=FAST
    )
    (worker,) = await cluster.wait_workers(queen, "demo", 1)
    # The timing (3 checks in a row, SIGTERM, SIGKILL) is proven on a fake clock in
    # tests/unit/test_hive_supervisor.py; here: a really hung process is found and killed.
    failed = await wait_worker(cluster, hive, lambda w: "not restarting" in w.failure_reason)
    assert failed.failure_reason.startswith("failed 3 health checks in a row: DEADLINE_EXCEEDED")
    assert failed.failure_reason.endswith("not restarting (restart policy never)")
    assert not psutil.pid_exists(worker.pid)


async def test_worker_stuck_loading_is_killed_after_the_load_timeout(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(
        queen, "h1", "model=demo,restart=never,load_delay=600", extra=(*FAST, "--load-timeout", "1")
    )
    loading = await wait_worker(cluster, hive, lambda w: w.state == common_pb2.WORKER_STATE_LOADING)
    failed = await wait_worker(cluster, hive, lambda w: "not restarting" in w.failure_reason)
    assert failed.failure_reason.startswith("still LOADING after 1s (load timeout)")
    assert not psutil.pid_exists(loading.pid)


async def test_idle_workers_are_retired_but_busy_ones_are_not(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(
        queen,
        "h1",
        "model=demo,count=2,token_delay=0.1,idle_retire=1",
        extra=(*FAST, "--idle-timeout", "1.5"),
    )
    workers = await cluster.wait_workers(queen, "demo", 2)
    stub = cluster.queen_stub(queen)
    # Keep one worker streaming for ~3 s: twice the idle timeout, with health checks every 0.2 s.
    long = asyncio.create_task(collect(stub, tokens=30))

    async def one_left() -> list[common_pb2.WorkerRecord] | None:
        left = await hive_workers(cluster, hive)
        return left if len(left) == 1 else None

    (busy,) = await eventually(one_left, timeout=10)
    assert not long.done()
    idle = next(w for w in workers if w.id != busy.id)
    assert not psutil.pid_exists(idle.pid)
    assert len(await long) == 30
    # Idle from the end of its last request, then retired too.
    await eventually(lambda: _none_left(cluster, hive), timeout=10)


async def _none_left(cluster: Cluster, hive: Proc) -> bool:
    return not await hive_workers(cluster, hive)


async def test_boot_workers_are_never_idle_retired(cluster: Cluster) -> None:
    """What `make run` starts keeps serving however long nobody asks anything."""
    queen = cluster.start_queen()
    hive = cluster.start_hive(
        queen,
        "h1",
        "model=demo,count=2",
        "model=spare,idle_retire=1",
        extra=(*FAST, "--idle-timeout", "1"),
    )
    kept = {w.id: w.pid for w in await cluster.wait_workers(queen, "demo", 2)}

    async def spare_retired() -> bool:
        return all(w.model != "spare" for w in await hive_workers(cluster, hive))

    await eventually(spare_retired, timeout=15)

    async def demo_unchanged() -> bool:
        demo = {w.id: w.pid for w in await hive_workers(cluster, hive) if w.model == "demo"}
        return demo == kept

    await stays_true(demo_unchanged, seconds=2.0)  # twice the idle timeout, checks every 0.2 s
    assert tokens_in(await collect(cluster.queen_stub(queen))) == 4


async def test_graceful_stop_lets_the_stream_finish_and_force_does_not(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", "model=demo,count=2,token_delay=0.05", extra=FAST)
    await cluster.wait_workers(queen, "demo", 2)
    stub = cluster.queen_stub(queen)
    hive_stub = cluster.hive_stub(hive)

    stream = asyncio.create_task(collect(stub, tokens=20))  # ~1 s
    first = await wait_worker(cluster, hive, lambda w: w.state == common_pb2.WORKER_STATE_BUSY)
    began = time.monotonic()
    stopped = await hive_stub.StopWorker(hive_pb2.StopWorkerRequest(worker_id=first.id), timeout=15)
    assert stopped.worker.id == first.id
    assert len(await stream) == 20  # finished, not cut
    assert time.monotonic() - began >= 0.5
    assert not psutil.pid_exists(first.pid)

    (second,) = await hive_workers(cluster, hive)
    await cluster.wait_workers(queen, "demo", 1)
    call = stub.Infer(common_pb2.InferRequest(model="demo", prompt="x", max_tokens=200))
    await call.read()
    await hive_stub.StopWorker(hive_pb2.StopWorkerRequest(worker_id=second.id, force=True))
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        while True:
            await call.read()
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "chunk(s) were delivered" in (cut.value.details() or "")
    assert not psutil.pid_exists(second.pid)


async def test_sigkilled_hive_restarts_and_readopts_its_workers(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", "model=demo,count=3", extra=FAST)
    before = {w.id: w.pid for w in await cluster.wait_workers(queen, "demo", 3)}
    port = hive.port

    hive.signal(signal.SIGKILL)
    hive.wait(5)
    assert all(psutil.pid_exists(pid) for pid in before.values())  # orphaned, still serving
    victim_id = sorted(before)[0]
    os.kill(before[victim_id], signal.SIGKILL)  # dies while nobody watches

    hive = cluster.start_hive(queen, "h1", "model=demo,count=3", extra=FAST, port=port)
    # The queen's rows from before the hive died are still there; wait for the new hive's word.
    await wait_worker(
        cluster,
        hive,
        lambda w: w.id == victim_id and w.state == common_pb2.WORKER_STATE_IDLE,
        timeout=20,
    )
    admin = cluster.admin_stub(queen)

    async def relearned() -> list[common_pb2.WorkerRecord] | None:
        listed = (await admin.ListWorkers(queen_pb2.ListWorkersRequest())).workers
        victim = next((w for w in listed if w.id == victim_id), None)
        ready = [w for w in listed if w.state in READY_STATES]
        return list(listed) if victim and victim.restart_count == 1 and len(ready) == 3 else None

    after = await eventually(relearned, timeout=20)
    assert {w.id for w in after} == set(before)  # the same three, none started twice
    by_id = {w.id: w for w in after}
    for worker_id, pid in before.items():
        if worker_id == victim_id:
            assert by_id[worker_id].pid != pid and by_id[worker_id].restart_count == 1
        else:
            assert by_id[worker_id].pid == pid and by_id[worker_id].restart_count == 0
    assert len(await hive_workers(cluster, hive)) == 3
    stub = cluster.queen_stub(queen)
    assert all(tokens_in(r) == 4 for r in await asyncio.gather(*(collect(stub) for _ in range(6))))

    # An adopted worker (not the hive's child) still has its death seen at once: through its
    # pidfd (an exit of unknown status), not after health checks failed.
    adopted = next(w for w in after if w.id != victim_id)
    os.kill(adopted.pid, signal.SIGKILL)
    dead = await wait_worker(
        cluster, hive, lambda w: w.id == adopted.id and w.state == common_pb2.WORKER_STATE_FAILED
    )
    assert dead.failure_reason.startswith("exited (status unknown"), dead.failure_reason
    await wait_worker(
        cluster,
        hive,
        lambda w: (
            w.id == adopted.id and w.restart_count == 1 and w.state == common_pb2.WORKER_STATE_IDLE
        ),
    )


async def test_process_operations_find_orphans_and_refuse_strangers(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    first = cluster.start_hive(queen, "h1", "model=demo,count=2")
    workers = await cluster.wait_workers(queen, "demo", 2)
    listed = (
        await cluster.hive_stub(first).ListProcesses(hive_pb2.ListProcessesRequest())
    ).processes
    pids = {w.pid for w in workers}
    ours = {p.pid: p for p in listed if p.pid in pids}
    assert set(ours) == {w.pid for w in workers}
    assert all(p.known and p.model == "demo" and p.hive_id == "h1" for p in ours.values())
    assert all(p.rss_bytes > 0 for p in ours.values())

    first.signal(signal.SIGKILL)  # its workers are orphans now
    first.wait(5)
    other = cluster.start_hive(queen, "h2")  # its own state dir: it does not know them
    stub = cluster.hive_stub(other)
    listed = (await stub.ListProcesses(hive_pb2.ListProcessesRequest())).processes
    orphans = [p for p in listed if p.pid in ours]
    assert len(orphans) == 2 and not any(p.known for p in orphans)

    got = await stub.GetProcess(hive_pb2.GetProcessRequest(pid=orphans[0].pid))
    assert got.process.worker_id == ours[orphans[0].pid].worker_id
    killed = await stub.KillProcess(hive_pb2.KillProcessRequest(pid=orphans[0].pid))
    assert killed.process.pid == orphans[0].pid
    assert not psutil.pid_exists(orphans[0].pid) or (
        psutil.Process(orphans[0].pid).status() == psutil.STATUS_ZOMBIE
    )

    for pid, code in [
        (os.getpid(), grpc.StatusCode.FAILED_PRECONDITION),
        (other.pid, grpc.StatusCode.FAILED_PRECONDITION),
        (0, grpc.StatusCode.INVALID_ARGUMENT),
        (2**22 + 12345, grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.KillProcess(hive_pb2.KillProcessRequest(pid=pid))
        assert err.value.code() == code, pid
    assert psutil.pid_exists(os.getpid())


async def test_process_operations_are_scoped_to_the_hive_that_launched_them(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A credential in the hive's environment must not reach its workers.
    monkeypatch.setenv("APIARY_SOMETHING_TOKEN", "hive-secret")
    queen = cluster.start_queen()
    first = cluster.start_hive(queen, "h1", "model=one")
    second = cluster.start_hive(queen, "h2", "model=two")
    (one,) = await cluster.wait_workers(queen, "one", 1)
    environ = psutil.Process(one.pid).environ()
    assert "APIARY_SOMETHING_TOKEN" not in environ
    assert environ["APIARY_HIVE_ID"] == "h1" and environ["APIARY_WORKER_ID"] == one.id

    stub = cluster.hive_stub(second)
    listed = (await stub.ListProcesses(hive_pb2.ListProcessesRequest())).processes
    theirs = next(p for p in listed if p.pid == one.pid)
    assert theirs.owner == hive_pb2.PROCESS_OWNER_OTHER_HIVE and not theirs.known
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.KillProcess(hive_pb2.KillProcessRequest(pid=one.pid))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "of hive h1, which is running" in (err.value.details() or "")
    assert psutil.pid_exists(one.pid)
    own = await cluster.hive_stub(first).GetProcess(hive_pb2.GetProcessRequest(pid=one.pid))
    assert own.process.owner == hive_pb2.PROCESS_OWNER_THIS_HIVE and own.process.known

    # A worker process started by hand, outside a session of its own: killpg cannot reach it,
    # and the kill is reported only once the process is really gone.
    by_hand = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**cluster.env(), "APIARY_WORKER_ID": "w-by-hand"},
    )
    try:
        # /proc shows the new environment once the child has exec'd (not at once on a busy box).
        await eventually(lambda: started_as_worker(by_hand.pid), 10)
        killed = await stub.KillProcess(hive_pb2.KillProcessRequest(pid=by_hand.pid), timeout=10)
        assert killed.process.owner == hive_pb2.PROCESS_OWNER_ORPHAN
        assert by_hand.wait(5) == -signal.SIGKILL
    finally:
        by_hand.kill()
        by_hand.wait()


async def test_backend_catalog_and_hive_metrics(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", "model=demo,token_delay=0.01")
    await cluster.wait_workers(queen, "demo", 1)
    stub = cluster.hive_stub(hive)
    backends = {
        b.name: b for b in (await stub.ListBackends(hive_pb2.ListBackendsRequest())).backends
    }
    echo = backends["echo"]
    assert echo.available and echo.for_testing and echo.version and "cpu" in echo.devices
    assert "token_delay" in echo.options
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetBackend(hive_pb2.GetBackendRequest(name="tensorrt"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "echo" in (err.value.details() or "")

    await collect(cluster.queen_stub(queen), tokens=50)
    admin = cluster.admin_stub(queen)

    async def sampled() -> queen_pb2.GetHiveResponse | None:
        reply = await admin.GetHive(queen_pb2.GetHiveRequest(hive_id="h1"))
        return reply if reply.workers and reply.workers[0].rss_bytes > 0 else None

    reply = await eventually(sampled)
    res, stats = reply.hive.resources, reply.hive.stats
    assert res.cpu_count >= 1 and 0 < res.memory_available_bytes <= res.memory_total_bytes
    assert stats.spawns == 1 and stats.crashes == 0 and stats.uptime_seconds > 0
    assert reply.workers[0].rss_bytes > 10 * 2**20


async def test_second_hive_on_the_same_state_dir_refuses_to_start(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1")
    with pytest.raises(RuntimeError, match="another hive"):
        cluster.start_hive(queen, "h1")


def started_as_worker(pid: int) -> bool:
    try:
        return "APIARY_WORKER_ID" in psutil.Process(pid).environ()
    except psutil.Error:
        return False
