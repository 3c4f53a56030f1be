"""What the hive hears of its workers, fed to each one's lifecycle: their own reports (ready,
loading), and what the monitor asks them (health, status) or measures (cpu, memory).

Apart from the supervisor, which only carries out what the lifecycles decide: these are the
events that come in on the workers' schedule (a report) or the monitor's (every interval).
"""

from __future__ import annotations

import asyncio

import structlog

from hive.managed import ManagedWorker
from hive.states import Conflict
from hive.supervisor import Supervisor
from protos.v1 import common_pb2, hive_pb2

log = structlog.get_logger("hive.monitor")


# ---- what workers tell us ---------------------------------------------------------


def _reporter(supervisor: Supervisor, worker_id: str, pid: int) -> ManagedWorker:
    """The worker a report names; Conflict if a process other than its own sent it."""
    worker = supervisor.get(worker_id)
    ident = worker.identity
    if ident is not None and pid and pid != ident.pid:
        raise Conflict(f"worker {worker_id} runs as pid {ident.pid}, not {pid}")
    return worker


async def report_ready(
    supervisor: Supervisor,
    worker_id: str,
    address: str,
    pid: int,
    load_error: str,
    said: hive_pb2.ReportReadyRequest | None = None,
) -> ManagedWorker:
    """The worker's ready callback: it serves at `address` (what it serves as `said`), or
    could not load."""
    worker = _reporter(supervisor, worker_id, pid)
    now = supervisor.clock.monotonic()
    if load_error:
        actions = worker.life.load_failed(now, load_error)
    else:
        actions = worker.life.ready(now, address)
        worker.last_activity = supervisor.clock.time()
        if said is not None:
            worker.task, worker.context_length = said.task, said.context_length
            worker.features = tuple(said.features)
    await supervisor.carry_out(worker, actions)
    return worker


def report_loading(
    supervisor: Supervisor, worker_id: str, pid: int, progress: float, detail: str
) -> None:
    """How far a loading worker has got: shown to operators, decides nothing."""
    worker = _reporter(supervisor, worker_id, pid)
    fraction = worker.life.load_progress(progress)
    if fraction is not None:
        worker.load_progress, worker.status_detail = fraction, detail
        supervisor.on_change()


# ---- what the monitor asks and measures -------------------------------------------


def sample_resources(supervisor: Supervisor) -> None:
    """Per-worker cpu % (since the previous sample) and rss, for heartbeats and listings."""
    for worker in supervisor.workers.values():
        ident = worker.identity
        worker.cpu_percent, worker.rss_bytes = (
            supervisor.launcher.sample(ident) if ident is not None else (0.0, 0)
        )


async def monitor_forever(supervisor: Supervisor) -> None:
    while True:
        try:
            await monitor_once(supervisor)
        except Exception:
            # The monitor must never die silently: log and keep going.
            log.exception("monitor step failed")
        await supervisor.clock.sleep(supervisor.settings.health_interval)


async def monitor_once(supervisor: Supervisor) -> None:
    """One round of health checks and status reads of every ready worker."""
    ready = [w for w in supervisor.workers.values() if w.life.serving]
    await asyncio.gather(*(_check(supervisor, w) for w in ready))


async def _check(supervisor: Supervisor, worker: ManagedWorker) -> None:
    client, clock = supervisor.client, supervisor.clock
    address, timeout = worker.life.address, supervisor.settings.health_timeout
    ok, error = await client.check(worker.id, address, timeout)
    status = await client.status(worker.id, address, timeout) if ok else None
    if worker.life.address != address:
        return  # a different process now: this answer is about the old one
    now = clock.monotonic()
    actions = worker.life.health_checked(now, ok, error)
    if status is not None and not actions:
        worker.requests_completed = status.requests_completed
        worker.requests_failed = status.requests_failed
        if status.HasField("prefix_cache"):
            worker.prefix_cache = status.prefix_cache
        # Also here, not only when ready: a worker adopted by a restarted hive says it too.
        worker.task, worker.context_length = status.task, status.context_length
        worker.features = tuple(status.features)
        # Only requests count as activity: health checks and GetStatus never move it.
        worker.last_activity = max(worker.last_activity, float(status.last_activity.seconds))
        busy = status.state == common_pb2.WORKER_STATE_BUSY
        idle_for = clock.time() - worker.last_activity
        actions = worker.life.status(now, busy, idle_for, keep=worker.keep)
    await supervisor.carry_out(worker, actions)
