"""Re-adopting the workers an earlier process of this hive left running, once at boot.

Apart from the supervisor because it runs once, before the first heartbeat, and reads what
the steady state never needs: the table on disk and the process table. Each row gets the
lifecycle's `adoption` decision (hive/states.py); this module only carries it out, with the
supervisor's table, launcher and worker client.
"""

from __future__ import annotations

import asyncio
import signal

import structlog

from hive.launcher import Launched, ProcessIdentity
from hive.managed import ManagedWorker
from hive.states import Adoption, adoption
from hive.store import TableUnreadable, WorkerRow, recovered_row, row_spec
from hive.supervisor import Supervisor

log = structlog.get_logger("hive.adoption")


async def adopt(supervisor: Supervisor) -> None:
    """After a hive restart: take back live, healthy workers; kill or restart the rest.

    Workers the table does not name (it was unreadable, or a row was) are found by their
    markers and adopted too: none is orphaned, and none started twice.
    """
    try:
        rows = supervisor.store.load()
    except TableUnreadable as exc:
        log.error(
            "worker table unreadable; recovering workers from the process table",
            path=str(exc.path),
            saved_as=str(exc.saved_as or "(could not be moved)"),
            error=exc.reason,
        )
        rows = []
    rows += _recovered(supervisor, {row.id for row in rows})
    await asyncio.gather(*(_adopt_row(supervisor, row) for row in rows))
    supervisor.changed()


def _recovered(supervisor: Supervisor, known: set[str]) -> list[WorkerRow]:
    """Rows rebuilt from live worker processes of this hive id that `known` lacks."""
    rows = []
    for found in supervisor.launcher.own_workers():
        if found.worker_id in known:
            continue
        try:
            row = recovered_row(found)
        except ValueError as exc:
            log.error("cannot recover worker", worker_id=found.worker_id, error=str(exc))
            continue
        log.warning("recovered worker from the process table", worker_id=row.id, pid=row.pid)
        rows.append(row)
    return rows


def _restore(supervisor: Supervisor, row: WorkerRow) -> ManagedWorker:
    worker = supervisor.add(row.id, row_spec(row), keep=row.keep)
    worker.life.restore(row.address, row.restart_count, row.failure_reason)
    worker.started_at = row.started_at
    return worker


async def _adopt_row(supervisor: Supervisor, row: WorkerRow) -> None:
    launcher, clock = supervisor.launcher, supervisor.clock
    ident = ProcessIdentity(row.pid, row.create_time) if row.pid else None
    alive = ident is not None and launcher.owns(ident, row.id)
    plan = adoption(row.state, alive, bool(row.address))
    if plan is Adoption.KILL_AND_DROP:
        if alive and ident is not None:
            await _kill(supervisor, ident)
        return
    worker = _restore(supervisor, row)
    now = clock.monotonic()
    if plan is Adoption.RESTORE_FAILED:
        await supervisor.carry_out(worker, worker.life.failed_before(now, row.restart_pending))
        return
    if plan is Adoption.GONE or ident is None:
        reason = "process was gone when the hive restarted"
        await supervisor.carry_out(worker, worker.life.not_adopted(now, reason))
        return
    reason = row.failure_reason or "not in a state to adopt after the hive restarted"
    if plan is Adoption.CHECK_HEALTH:
        timeout = supervisor.settings.health_timeout
        ok, error = await supervisor.client.check(row.id, row.address, timeout)
        if ok:
            await _attach(supervisor, worker, ident, ready=True)
            return
        reason = f"did not answer health checks after the hive restarted: {error}"
    elif plan is Adoption.ADOPT_LOADING:
        await _attach(supervisor, worker, ident, ready=False)
        return
    await _kill(supervisor, ident)
    await supervisor.carry_out(worker, worker.life.not_adopted(clock.monotonic(), reason))


async def _attach(
    supervisor: Supervisor, worker: ManagedWorker, ident: ProcessIdentity, ready: bool
) -> None:
    """Take over a live process we did not start: watched through a pidfd from now on."""
    worker.launched = Launched(ident)
    worker.last_activity = supervisor.clock.time()
    supervisor.watch(worker, worker.launched)
    await supervisor.carry_out(worker, worker.life.adopted(supervisor.clock.monotonic(), ready))


async def _kill(supervisor: Supervisor, ident: ProcessIdentity) -> None:
    supervisor.launcher.signal_group(ident, signal.SIGKILL)
    await supervisor.launcher.wait_gone(ident)
