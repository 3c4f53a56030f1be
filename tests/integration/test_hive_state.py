"""The hive's state on disk under faults, with real processes: a corrupt table, a full disk,
failed rows that expire."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from harness import Cluster, Proc, stays_true
from harness import wait_until as eventually
from protos.v1 import common_pb2, hive_pb2, queen_pb2

FAST = ("--restart-backoff", "0.1", "--term-grace", "0.5")


async def hive_workers(cluster: Cluster, hive: Proc) -> dict[str, int]:
    reply = await cluster.hive_stub(hive).ListWorkers(hive_pb2.ListHiveWorkersRequest(), timeout=2)
    return {w.id: w.pid for w in reply.workers}


async def test_a_junk_table_is_set_aside_and_live_workers_are_recovered(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", "model=demo,count=2", extra=FAST)
    before = {w.id: w.pid for w in await cluster.wait_workers(queen, "demo", 2)}
    hive.signal(signal.SIGKILL)
    hive.wait(5)
    table = cluster.tmp / "state-h1" / "workers.json"
    table.write_text("{this is not json")

    hive = cluster.start_hive(queen, "h1", "model=demo,count=2", extra=FAST, port=hive.port)

    async def recovered() -> bool:
        return await hive_workers(cluster, hive) == before  # same ids, same processes

    await eventually(recovered, timeout=20)
    await stays_true(recovered, seconds=1.0)  # and no duplicate spawned for --spawn count=2
    broken = list(table.parent.glob("workers.json.broken-*"))
    assert len(broken) == 1 and broken[0].read_text() == "{this is not json"
    log = hive.log()
    assert "worker table unreadable" in log and str(table) in log and str(broken[0]) in log


async def test_failed_rows_are_listed_then_dropped_after_the_failed_ttl(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(
        queen,
        "h1",
        "model=bad,restart=never,fault_exit_on_load=3,idle_retire=1",
        extra=(*FAST, "--failed-ttl", "1.5"),
    )
    admin = cluster.admin_stub(queen)

    async def listed_failed() -> list[str]:
        failed = queen_pb2.ListWorkersRequest(state=common_pb2.WORKER_STATE_FAILED)
        return [w.id for w in (await admin.ListWorkers(failed, timeout=2)).workers]

    async def gone() -> bool:
        return not (await admin.ListWorkers(queen_pb2.ListWorkersRequest(), timeout=2)).workers

    await eventually(listed_failed, timeout=15)  # visible with `worker list --state failed`
    await eventually(gone, timeout=15)  # then gone (an idle_retire=1 boot worker: not replaced)


async def test_a_kept_boot_worker_that_failed_for_good_is_replaced_once_its_row_expires(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(
        queen,
        "h1",
        "model=bad,restart=never,fault_exit_on_load=3",
        extra=(*FAST, "--failed-ttl", "1"),
    )
    admin = cluster.admin_stub(queen)
    seen: set[str] = set()

    async def replaced() -> bool:
        workers = (await admin.ListWorkers(queen_pb2.ListWorkersRequest(), timeout=2)).workers
        assert len(workers) <= 1  # one at a time: the count is kept, never exceeded
        seen.update(w.id for w in workers)
        return len(seen) >= 2

    await eventually(replaced, timeout=15)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (as root), for a state dir that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


async def test_a_spawn_that_cannot_be_saved_starts_nothing_and_status_says_why(
    cluster: Cluster, small_disk: Path
) -> None:
    queen = cluster.start_queen()
    state = small_disk / "state"
    hive = cluster.start_hive(queen, "h1", extra=("--state-dir", str(state)))
    admin = cluster.admin_stub(queen)
    await eventually(lambda: _hive_known(admin), timeout=10)
    filler = fill(small_disk)
    spawn = hive_pb2.SpawnWorkerRequest(model="demo", backend="echo", wait_ready=True)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cluster.hive_stub(hive).SpawnWorker(spawn, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = refused.value.details() or ""
    assert "cannot save the worker table" in details and "was not started" in details
    assert await hive_workers(cluster, hive) == {}
    assert [p for p in cluster.marked_processes() if p.name().startswith("python")]

    async def problem_shown() -> str:
        hives = (await admin.ListHives(queen_pb2.ListHivesRequest(), timeout=2)).hives
        return "\n".join(p for h in hives for p in h.problems)

    assert "No space left on device" in await eventually(problem_shown, timeout=10)
    filler.unlink()
    await cluster.hive_stub(hive).SpawnWorker(spawn, timeout=20)

    async def problem_cleared() -> bool:
        return not await problem_shown()

    await eventually(problem_cleared, timeout=10)


async def _hive_known(admin: object) -> bool:
    hives = await admin.ListHives(queen_pb2.ListHivesRequest(), timeout=2)  # type: ignore[attr-defined]
    return bool(hives.hives)


async def test_orphans_of_a_hive_that_stays_dead_stop_by_themselves(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", "model=demo", extra=("--orphan-timeout", "1.5"))
    (worker,) = await cluster.wait_workers(queen, "demo", 1)
    hive.signal(signal.SIGKILL)
    hive.wait(5)
    assert psutil.pid_exists(worker.pid)

    async def exited() -> bool:
        return not psutil.pid_exists(worker.pid)

    await eventually(exited, timeout=20)
    log = (cluster.tmp / "state-h1" / "logs" / f"{worker.id}.log").read_text()
    assert "no word from the hive: stopping (orphaned)" in log


async def test_a_hive_restarted_within_the_orphan_timeout_keeps_its_workers(
    cluster: Cluster,
) -> None:
    queen = cluster.start_queen()
    timeout = ("--orphan-timeout", "2", *FAST)
    hive = cluster.start_hive(queen, "h1", "model=demo", extra=timeout)
    (worker,) = await cluster.wait_workers(queen, "demo", 1)
    hive.signal(signal.SIGKILL)
    hive.wait(5)
    hive = cluster.start_hive(queen, "h1", "model=demo", extra=timeout, port=hive.port)

    async def same_worker() -> bool:
        return await hive_workers(cluster, hive) == {worker.id: worker.pid}

    await eventually(same_worker, timeout=15)
    await stays_true(same_worker, seconds=3.0)  # past the orphan timeout: adopted, not orphaned
