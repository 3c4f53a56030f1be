"""The Supervisor carrying out the lifecycle, on a fake clock with a fake launcher: no processes."""

from __future__ import annotations

import asyncio
import errno
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from apiary.errors import StatusError
from hive.adoption import adopt
from hive.boot import BootWorkers
from hive.launcher import FoundWorker
from hive.managed import ManagedWorker
from hive.monitor import monitor_once, report_ready
from hive.records import worker_record
from hive.spec import WorkerSpec
from hive.states import LifecycleSettings, Phase
from hive.store import WorkerRow, recovered_row, row_spec, spec_json, worker_row
from hive.supervisor import Supervisor, SupervisorSettings
from protos.v1 import common_pb2
from tests.fakes import FakeClock, settle
from tests.unit.hive_fakes import FakeLauncher, FakeWorkerClient, MemoryStore

ADDRESS = "127.0.0.1:6000"
NEVER = common_pb2.RESTART_POLICY_NEVER


@dataclass
class Hive:
    supervisor: Supervisor
    clock: FakeClock
    launcher: FakeLauncher
    client: FakeWorkerClient
    store: MemoryStore
    boot: BootWorkers

    async def ready(self, spec: WorkerSpec | None = None, keep: bool = False) -> ManagedWorker:
        worker = await self.supervisor.spawn(spec or WorkerSpec("demo", "echo"), keep=keep)
        assert worker.launched is not None
        await report_ready(self.supervisor, worker.id, ADDRESS, worker.launched.pid, "")
        return worker

    def kill(self, worker: ManagedWorker, code: int = -9) -> None:
        assert worker.identity is not None
        self.launcher.kill(worker.identity, code)


def make_hive(store: MemoryStore | None = None) -> Hive:
    clock, launcher, client = FakeClock(), FakeLauncher(), FakeWorkerClient()
    store = store or MemoryStore()
    settings = SupervisorSettings(
        lifecycle=LifecycleSettings(stop_grace=10, term_grace=3, load_timeout=120),
        default_policy=common_pb2.RESTART_POLICY_ON_FAILURE,
    )
    supervisor = Supervisor("h1", "127.0.0.1:7071", store, settings, launcher, client, clock)
    return Hive(supervisor, clock, launcher, client, store, BootWorkers(supervisor))


@pytest.fixture
async def hive() -> AsyncIterator[Hive]:
    made = make_hive()
    try:
        yield made
    finally:
        await made.supervisor.close()


async def test_a_crashed_worker_comes_back_after_its_backoff(hive: Hive) -> None:
    worker = await hive.ready()
    assert worker.state == common_pb2.WORKER_STATE_IDLE
    assert hive.store.rows[0].state == "IDLE" and hive.store.rows[0].address == ADDRESS
    hive.kill(worker)
    await settle()
    record = worker_record(hive.supervisor, worker)
    assert record.state == common_pb2.WORKER_STATE_FAILED and record.failure_reason
    assert 0.8 <= record.restart_in_seconds <= 1.2
    assert hive.client.forgotten == [ADDRESS]  # the dead process's channel is closed
    await hive.clock.run(0.75)
    assert len(hive.launcher.argvs) == 1
    await hive.clock.run(0.5)
    assert len(hive.launcher.argvs) == 2 and worker.life.phase is Phase.LOADING
    supervisor = hive.supervisor
    assert (supervisor.spawns, supervisor.crashes, supervisor.restarts_done) == (2, 1, 1)
    assert worker.life.restart_count == 1 and hive.supervisor.workers[worker.id] is worker


async def test_graceful_stop_escalates_on_the_clock_when_the_worker_ignores_it(hive: Hive) -> None:
    hive.launcher.ignores_sigterm = True
    worker = await hive.ready()
    assert worker.identity is not None
    pid = worker.identity.pid
    stopping = asyncio.create_task(hive.supervisor.stop(worker.id))
    await settle()
    assert hive.client.shutdowns == [(ADDRESS, 10.0)]
    assert worker.state == common_pb2.WORKER_STATE_STOPPING
    await hive.clock.run(10.9)
    assert hive.launcher.signals == []  # still within the grace in-flight streams get
    await hive.clock.run(0.2)
    assert hive.launcher.signals == [(pid, signal.SIGTERM)]
    await hive.clock.run(3.0)
    assert hive.launcher.signals == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]
    assert await asyncio.wait_for(stopping, 1) is worker
    assert worker.id not in hive.supervisor.workers and hive.store.rows == []
    assert hive.supervisor.crashes == 0


async def test_failed_health_checks_kill_the_worker_and_it_restarts(hive: Hive) -> None:
    worker = await hive.ready()
    hive.client.healthy[ADDRESS] = False
    for _ in range(3):
        await monitor_once(hive.supervisor)
    await settle()
    assert hive.launcher.signals[0][1] == signal.SIGTERM
    assert worker.life.phase is Phase.RESTART_PENDING
    assert worker.failure_reason.startswith("failed 3 health checks in a row: DEADLINE_EXCEEDED")
    assert hive.supervisor.crashes == 1


async def test_a_worker_stuck_loading_is_killed_at_the_load_timeout(hive: Hive) -> None:
    worker = await hive.supervisor.spawn(WorkerSpec("demo", "echo"))
    await hive.clock.run(119.0)
    assert hive.launcher.signals == []
    await hive.clock.run(1.0)
    assert [sig for _, sig in hive.launcher.signals] == [signal.SIGTERM]
    assert worker.failure_reason == "still LOADING after 120s (load timeout)"
    assert worker.settled.is_set()  # a SpawnWorker(wait_ready) gets its answer


async def test_idle_workers_are_retired_unless_kept(hive: Hive) -> None:
    idle = await hive.ready()
    kept = await hive.ready(keep=True)
    await hive.clock.run(299.0)
    await monitor_once(hive.supervisor)
    assert hive.client.shutdowns == []
    await hive.clock.run(2.0)
    await monitor_once(hive.supervisor)
    assert hive.client.shutdowns == [(ADDRESS, 10.0)]
    await hive.clock.run(11.5)  # the fake ignores Shutdown; SIGTERM ends it
    assert idle.id not in hive.supervisor.workers and kept.id in hive.supervisor.workers


async def test_a_process_that_cannot_start_is_failed_and_not_restarted(hive: Hive) -> None:
    hive.launcher.fail_next_start = "No such file or directory"
    worker = await hive.supervisor.spawn(WorkerSpec("demo", "echo"))
    assert worker.life.phase is Phase.FAILED and worker.settled.is_set()
    assert worker.failure_reason == "could not start process: No such file or directory"
    await hive.clock.run(120.0)
    assert hive.launcher.argvs == []


def phase(worker: ManagedWorker) -> Phase:
    """The worker's phase now (a call, so type narrowing from earlier asserts does not stick)."""
    return worker.life.phase


def row(worker_id: str, state: str, pid: int, **kwargs: object) -> WorkerRow:
    return WorkerRow(
        id=worker_id,
        model="demo",
        backend="echo",
        slots=1,
        device="cpu",
        restart_policy=common_pb2.RESTART_POLICY_ON_FAILURE,
        pid=pid,
        create_time=2.0,
        address=f"127.0.0.1:{pid}" if state == "IDLE" else "",
        state=state,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_adoption_of_live_dead_and_foreign_rows() -> None:
    rows = [
        row("w-live", "IDLE", 501),
        row("w-mute", "IDLE", 502),
        row("w-dead", "IDLE", 503),
        row("w-foreign", "IDLE", 504),
        row("w-stopping", "STOPPING", 505),
        row("w-failed", "FAILED", 0, restart_pending=True, failure_reason="exited with code 1"),
    ]
    made = make_hive(MemoryStore(rows))
    launcher = made.launcher
    live = launcher.add_orphan(501, "w-live")
    mute = launcher.add_orphan(502, "w-mute")
    launcher.add_orphan(504, "someone-else")  # the pid lives on, but it is not our worker
    stopping = launcher.add_orphan(505, "w-stopping")
    made.client.healthy["127.0.0.1:502"] = False
    try:
        await adopt(made.supervisor)
        workers = made.supervisor.workers
        assert set(workers) == {"w-live", "w-mute", "w-dead", "w-foreign", "w-failed"}
        assert workers["w-live"].life.phase is Phase.IDLE
        assert workers["w-live"].identity == live and launcher.argvs == []
        assert (mute.pid, signal.SIGKILL) in launcher.signals
        assert (stopping.pid, signal.SIGKILL) in launcher.signals
        assert all(pid != 504 for pid, _ in launcher.signals)  # never signal a stranger
        for worker_id in ("w-mute", "w-dead", "w-foreign", "w-failed"):
            assert workers[worker_id].life.phase is Phase.RESTART_PENDING, worker_id
        assert workers["w-mute"].failure_reason.startswith("did not answer health checks")
        assert workers["w-dead"].failure_reason == "process was gone when the hive restarted"
        await made.clock.run(1.5)
        assert len(launcher.argvs) == 4  # each restarted once, under its own id
        assert {a[a.index("--worker-id") + 1] for a in launcher.argvs} == {
            "w-mute",
            "w-dead",
            "w-foreign",
            "w-failed",
        }
        # An adopted worker is not our child, and its death is still seen.
        launcher.kill(live)
        await settle()
        assert phase(workers["w-live"]) is Phase.RESTART_PENDING
        assert workers["w-live"].failure_reason.startswith("exited (status unknown")
    finally:
        await made.supervisor.close()


async def test_the_table_on_disk_follows_the_lifecycle(hive: Hive) -> None:
    worker = await hive.ready()
    saves = hive.store.saves
    hive.client.busy[ADDRESS] = True
    await monitor_once(hive.supervisor)
    assert worker.life.phase is Phase.BUSY
    assert hive.store.saves == saves  # BUSY/IDLE flips are not worth a write
    hive.kill(worker, code=1)
    await settle()
    (saved,) = hive.store.rows
    assert (saved.state, saved.restart_pending, saved.pid) == ("FAILED", True, 0)
    assert saved.failure_reason == "exited with code 1"
    assert saved == WorkerRow.from_json(saved.to_json())


async def test_boot_workers_are_kept_from_idle_retirement_and_their_count_is_kept(
    hive: Hive,
) -> None:
    supervisor = hive.supervisor
    hive.boot.entries = [
        (WorkerSpec("demo", "echo"), 2),
        (WorkerSpec("spare", "echo", idle_retire=True), 1),
    ]
    await hive.boot.keep()
    for worker in list(supervisor.workers.values()):
        assert worker.launched is not None
        await report_ready(supervisor, worker.id, ADDRESS, worker.launched.pid, "")
    kept = {w.id for w in supervisor.workers.values() if w.spec.model == "demo"}
    assert len(kept) == 2 and all(supervisor.workers[w].keep for w in kept)
    await hive.clock.run(400.0)
    await monitor_once(supervisor)
    await hive.clock.run(12.0)  # the spare one is retired (SIGTERM after its grace)
    assert {w.spec.model for w in supervisor.workers.values()} == {"demo"}
    # One fails for good: once its row expires, the hive brings the count back.
    failing, other = (supervisor.workers[w] for w in sorted(kept))
    failing.life.policy = NEVER
    hive.kill(failing, code=1)
    await hive.clock.run(601.0)
    demo = [w for w in supervisor.workers.values() if w.spec.model == "demo"]
    assert len(demo) == 2 and failing.id not in {w.id for w in demo}
    assert all(w.keep for w in demo)
    # An operator stopping one scales the hive down: it is not replaced.
    stopping = asyncio.create_task(supervisor.stop(other.id))
    await hive.clock.run(12.0)
    await stopping
    assert len([w for w in supervisor.workers.values() if w.spec.model == "demo"]) == 1


async def test_a_failed_row_is_dropped_after_the_failed_ttl(hive: Hive) -> None:
    worker = await hive.ready(WorkerSpec("demo", "echo", restart_policy=NEVER))
    hive.kill(worker, code=1)
    await settle()
    assert worker.life.phase is Phase.FAILED and hive.store.rows[0].state == "FAILED"
    await hive.clock.run(599.0)
    assert worker.id in hive.supervisor.workers
    await hive.clock.run(1.0)
    assert worker.id not in hive.supervisor.workers and hive.store.rows == []


async def test_a_spawn_whose_row_cannot_be_saved_starts_nothing(hive: Hive) -> None:
    hive.store.fail_with = errno.ENOSPC
    with pytest.raises(StatusError) as refused:
        await hive.supervisor.spawn(WorkerSpec("demo", "echo"))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cannot save the worker table" in refused.value.message
    assert refused.value.message.endswith("was not started")
    assert hive.launcher.argvs == [] and hive.supervisor.workers == {}
    assert "No space left" in hive.supervisor.persist_error  # what heartbeats carry
    hive.store.fail_with = 0
    await hive.ready()
    assert hive.supervisor.persist_error == ""


async def test_a_spawn_recorded_halfway_is_stopped(hive: Hive) -> None:
    hive.store.fail_after = 1  # the row is written, then the disk fills
    with pytest.raises(StatusError, match="was stopped: it could not be recorded"):
        await hive.supervisor.spawn(WorkerSpec("demo", "echo"))
    (_pid, sig) = hive.launcher.signals[0]
    assert sig == signal.SIGKILL and hive.supervisor.workers == {}


async def test_workers_missing_from_an_unreadable_table_are_found_by_their_markers() -> None:
    made = make_hive(MemoryStore(unreadable=True))
    ident = made.launcher.add_orphan(777, "w-kept")
    spec = '{"model": "demo", "backend": "echo", "slots": 2, "device": "cpu", "keep": true}'
    made.launcher.found = [FoundWorker(ident, "w-kept", spec, "127.0.0.1:777")]
    try:
        await adopt(made.supervisor)
        (worker,) = made.supervisor.workers.values()
        assert (worker.id, worker.identity, worker.spec.slots) == ("w-kept", ident, 2)
        assert worker.life.phase is Phase.IDLE and worker.keep
        assert made.launcher.argvs == []  # adopted, not started twice
    finally:
        await made.supervisor.close()


async def test_concurrent_reconciliations_do_not_spawn_twice(hive: Hive) -> None:
    hive.boot.entries = [(WorkerSpec("demo", "echo"), 2)]
    await asyncio.gather(*(hive.boot.keep() for _ in range(3)))
    assert len(hive.supervisor.workers) == 2


async def test_a_spec_survives_the_row_and_the_process_marker(hive: Hive) -> None:
    spec = WorkerSpec(
        "demo", "echo", slots=3, backend_options={"token_delay": "0"}, tags=["gpu", "region=eu"]
    )
    worker = await hive.ready(spec, keep=True)
    assert row_spec(worker_row(worker)) == spec
    assert worker.identity is not None
    found = FoundWorker(worker.identity, worker.id, spec_json(spec, keep=True), ADDRESS)
    rebuilt = recovered_row(found)
    assert row_spec(rebuilt) == spec and rebuilt.keep
    assert (rebuilt.state, rebuilt.address, rebuilt.pid) == ("IDLE", ADDRESS, worker.identity.pid)
