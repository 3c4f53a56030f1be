"""A worker stops by itself once its hive has not asked after it for the orphan timeout."""

from __future__ import annotations

import asyncio

from tests.fakes import FakeClock, settle
from worker.backends.echo import EchoBackend
from worker.orphans import stop_when_orphaned
from worker.server import WorkerIdentity, WorkerService


def service(clock: FakeClock) -> WorkerService:
    identity = WorkerIdentity("w-1", "h1", "demo", "echo", "cpu", 1)
    return WorkerService(identity, EchoBackend("demo"), clock=clock)


async def test_a_worker_whose_hive_went_quiet_stops_and_one_asked_after_does_not() -> None:
    clock = FakeClock()
    quiet, looked_after = service(clock), service(clock)
    tasks = [asyncio.create_task(stop_when_orphaned(s, 60.0, clock)) for s in (quiet, looked_after)]
    for _ in range(10):  # 10 s steps, for 100 s: the hive asks after one of them every 10 s
        await clock.run(10.0)
        looked_after.heard_from_hive = clock.monotonic()
    assert quiet.stop.is_set() and not looked_after.stop.is_set()
    tasks[1].cancel()
    await settle()
    assert tasks[0].done()


async def test_no_timeout_means_never() -> None:
    clock = FakeClock()
    worker = service(clock)
    await stop_when_orphaned(worker, 0.0, clock)  # returns at once
    assert not worker.stop.is_set()
