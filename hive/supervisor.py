"""The hive's worker table: carries out what each worker's lifecycle (hive/states.py) decides.

The supervisor feeds every event it sees into the worker's `Lifecycle` (a process
started or ended, a ready callback, a health check, time passing, a stop request)
and carries out the actions that come back: launch a process, ask it to shut down,
signal it, persist the table, heartbeat now, drop the row. It decides nothing
itself; the OS is behind `Launcher`, the workers' RPCs behind `WorkerClient`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog

from apiary.clock import Clock, SystemClock
from apiary.errors import StatusError
from apiary.protoutil import naming
from apiary.security import Security, tls_args
from hive.launcher import Launched, Launcher, ProcessIdentity
from hive.policy import DEFAULT_POLICY, RestartSettings, RestartTracker
from hive.spec import WorkerSpec
from hive.states import (
    PROTO_STATES,
    READY,
    Action,
    Adoption,
    AskShutdown,
    Conflict,
    CountCrash,
    ForgetAddress,
    Launch,
    Lifecycle,
    LifecycleSettings,
    Log,
    Persist,
    Phase,
    Remove,
    Report,
    Signal,
    adoption,
)
from hive.store import TableUnreadable, WorkerRow, WorkerStore
from hive.worker_client import WorkerClient
from protos.v1 import common_pb2

log = structlog.get_logger("hive.supervisor")

# Phases in which nobody waiting for a spawn has an answer yet.
UNSETTLED = frozenset({Phase.LOADING, Phase.ADOPTING})


class WorkerNotFound(KeyError):
    pass


def spec_json(spec: WorkerSpec, keep: bool) -> str:
    """What a worker process carries of its spec, for a hive that lost its table."""
    return json.dumps(
        {
            "model": spec.model,
            "backend": spec.backend,
            "slots": spec.slots,
            "device": spec.device,
            "backend_options": spec.backend_options,
            "restart_policy": int(spec.restart_policy),
            "tags": spec.tags,
            "keep": keep,
        }
    )


@dataclass
class SupervisorSettings:
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    health_interval: float = 5.0
    health_timeout: float = 2.0
    default_policy: common_pb2.RestartPolicy.ValueType = DEFAULT_POLICY
    worker_host: str = "127.0.0.1"
    # A worker stops by itself after this long without its hive asking after it (0 = never).
    orphan_timeout: float = 60.0


@dataclass(eq=False)
class ManagedWorker:
    """A row of the table: the spec, its lifecycle, and what runs for it right now."""

    id: str
    spec: WorkerSpec
    life: Lifecycle
    log_path: Path
    launched: Launched | None = None
    # Never retired for idleness (a worker the hive keeps from boot).
    keep: bool = False
    started_at: float = 0.0  # wall clock, for display
    last_activity: float = 0.0  # wall clock: last request ended, or ready time
    requests_completed: int = 0
    requests_failed: int = 0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    load_progress: float = 0.0
    status_detail: str = ""
    # What the worker last said it holds of computed prompts (backends that keep them).
    prefix_cache: common_pb2.PrefixCache | None = None
    # Set once the current process is ready or has failed: what SpawnWorker(wait_ready) waits on.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the row is gone (stop() waits on it).
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    # Wakes the worker's timer when its lifecycle's next deadline moved.
    rearm: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def state(self) -> common_pb2.WorkerState.ValueType:
        return PROTO_STATES[self.life.phase]

    @property
    def identity(self) -> ProcessIdentity | None:
        return self.launched.identity if self.launched and self.life.alive else None

    @property
    def failure_reason(self) -> str:
        return self.life.failure_reason

    def alive(self) -> bool:
        return self.life.alive


class Supervisor:
    def __init__(
        self,
        hive_id: str,
        hive_address: str,
        store: WorkerStore,
        settings: SupervisorSettings | None = None,
        launcher: Launcher | None = None,
        client: WorkerClient | None = None,
        clock: Clock | None = None,
        on_change: Callable[[], None] = lambda: None,
        security: Security | None = None,
    ) -> None:
        # Workers get the cluster's worker token (in their environment, never on a command
        # line) and this hive's TLS files.
        self.security = security or Security()
        self.hive_id = hive_id
        self.hive_address = hive_address
        self.store = store
        self.settings = settings or SupervisorSettings()
        self.launcher = launcher or Launcher(hive_id, str(store.state_dir))
        self.client = client or WorkerClient()
        self.clock = clock or SystemClock()
        self.on_change = on_change
        self.workers: dict[str, ManagedWorker] = {}
        self.spawns = 0
        self.crashes = 0
        self.restarts_done = 0
        self.started = self.clock.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._persisted: list[WorkerRow] | None = None
        # Why the table could not be saved last time ('' when it could): heartbeats carry it.
        self.persist_error = ""
        self._persist_errno = 0
        # Workers the hive keeps from boot (--spawn): spec, count. Their count is kept.
        self.boot: list[tuple[WorkerSpec, int]] = []
        self._keeping = asyncio.Lock()

    def get(self, worker_id: str) -> ManagedWorker:
        try:
            return self.workers[worker_id]
        except KeyError:
            raise WorkerNotFound(
                f"hive {self.hive_id} has no worker {worker_id!r}; "
                f"its workers: {naming(self.workers)}"
            ) from None

    def sample_resources(self) -> None:
        """Per-worker cpu % (since the previous sample) and rss, for heartbeats and listings."""
        for worker in self.workers.values():
            ident = worker.identity
            worker.cpu_percent, worker.rss_bytes = (
                self.launcher.sample(ident) if ident is not None else (0.0, 0)
            )

    # ---- the table --------------------------------------------------------

    def _new_worker(self, worker_id: str, spec: WorkerSpec, keep: bool = False) -> ManagedWorker:
        life = Lifecycle(
            worker_id,
            spec.restart_policy,
            self.settings.lifecycle,
            RestartTracker(self.settings.lifecycle.restart),
        )
        worker = ManagedWorker(worker_id, spec, life, self.store.log_path(worker_id), keep=keep)
        self.workers[worker_id] = worker
        self._track(self._timer(worker))
        return worker

    async def spawn(self, spec: WorkerSpec, keep: bool = False) -> ManagedWorker:
        """Start a worker; raises StatusError if its row cannot be saved (nothing then runs)."""
        if spec.restart_policy == common_pb2.RESTART_POLICY_UNSPECIFIED:
            spec.restart_policy = self.settings.default_policy
        worker = self._new_worker(f"w-{uuid.uuid4().hex[:12]}", spec, keep)
        if self._save():  # the row first: a process nobody recorded would be orphaned
            self._remove(worker)
            self._save()
            raise self._unsaved(f"worker {worker.id} was not started")
        await self._carry_out(worker, worker.life.start(self.clock.monotonic()))
        if self.persist_error and worker.alive():
            await self.stop(worker.id, force=True)
            raise self._unsaved(f"worker {worker.id} was stopped: it could not be recorded")
        return worker

    def _unsaved(self, consequence: str) -> StatusError:
        full = self._persist_errno in (errno.ENOSPC, errno.EDQUOT)
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.UNAVAILABLE
        return StatusError(code, f"{self.persist_error}; {consequence}")

    async def ensure(self, spec: WorkerSpec, count: int, keep: bool = True) -> None:
        """Have `count` workers of `spec` (boot-time --spawn): re-adopted ones count, and are
        kept from idle retirement like new ones unless `keep` is off."""
        have = [
            w
            for w in self.workers.values()
            if w.spec.same_as(spec) and w.life.phase not in (Phase.STOPPING, Phase.GONE)
        ]
        for worker in have:
            worker.keep = keep
        for _ in range(count - len(have)):
            await self.spawn(WorkerSpec(**vars(spec)), keep=keep)

    async def keep_boot_workers(self) -> None:
        """Bring each --spawn entry to its count: at boot (re-adopted workers count), and when
        a kept worker that failed for good has its row expire. A worker an operator stops is
        not replaced: that is how a hive is scaled down."""
        async with self._keeping:  # one reconciliation at a time, or both would spawn
            for spec, count in self.boot:
                try:
                    await self.ensure(spec, count, keep=not spec.idle_retire)
                except StatusError as refused:
                    log.error("cannot keep boot workers", model=spec.model, error=refused.message)

    # ---- carrying out actions ---------------------------------------------

    async def _carry_out(self, worker: ManagedWorker, actions: Iterable[Action]) -> None:
        changed = False
        for action in actions:
            if isinstance(action, Launch):
                await self._launch(worker, action.restart)
            elif isinstance(action, AskShutdown):
                self._track(self._ask_shutdown(worker, action))
            elif isinstance(action, Signal):
                if worker.identity is not None:
                    self.launcher.signal_group(worker.identity, action.sig)
            elif isinstance(action, Persist | Report):
                changed = True
            elif isinstance(action, Remove):
                self._remove(worker)
                if action.expired and worker.keep:
                    self._track(self.keep_boot_workers())  # a kept worker failed for good
            elif isinstance(action, ForgetAddress):
                self.client.forget(action.address)
            elif isinstance(action, CountCrash):
                self.crashes += 1
            elif isinstance(action, Log):
                getattr(log, action.level)(action.event, worker_id=worker.id, **dict(action.fields))
        if worker.life.phase not in UNSETTLED:
            worker.settled.set()
        worker.rearm.set()
        if changed:
            self._changed()

    async def _launch(self, worker: ManagedWorker, restart: bool) -> None:
        """Start the worker's process (a new one under the same id, for a restart)."""
        if restart:
            self.restarts_done += 1
        worker.settled = asyncio.Event()
        worker.launched = None
        worker.started_at = self.clock.time()
        worker.load_progress, worker.status_detail = 0.0, "starting"
        env = self.launcher.worker_env(
            worker.id,
            self.security.tokens.worker_token(self.hive_id, worker.id),
            spec_json(worker.spec, worker.keep),
        )
        try:
            launched = await self.launcher.start(self.worker_argv(worker), env, worker.log_path)
        except OSError as exc:
            failed = worker.life.launch_failed(self.clock.monotonic(), str(exc))
            await self._carry_out(worker, failed)
            return
        self.spawns += 1
        worker.launched = launched
        log.info(
            "worker spawned",
            worker_id=worker.id,
            pid=launched.pid,
            model=worker.spec.model,
            log=str(worker.log_path),
        )
        self._track(self._watch(worker, launched))
        await self._carry_out(worker, worker.life.launched(self.clock.monotonic()))

    def worker_argv(self, worker: ManagedWorker) -> list[str]:
        spec = worker.spec
        argv = [
            sys.executable, "-m", "worker",
            "--worker-id", worker.id,
            "--hive-id", self.hive_id,
            "--hive", self.hive_address,
            "--model", spec.model,
            "--backend", spec.backend,
            "--device", spec.device,
            "--slots", str(spec.slots),
            "--listen", f"{self.settings.worker_host}:0",
            "--stop-grace", str(self.settings.lifecycle.stop_grace),
            "--orphan-timeout", str(self.settings.orphan_timeout),
        ]  # fmt: skip
        for key, value in sorted(spec.backend_options.items()):
            argv += ["--option", f"{key}={value}"]
        if self.security.insecure:
            argv.append("--insecure")  # the operator said so to the hive
        return argv + tls_args(self.security.tls)

    async def _watch(self, worker: ManagedWorker, launched: Launched) -> None:
        """Await the process: its exit is seen the moment it happens (and a child is reaped)."""
        code = await self.launcher.wait_exit(launched)
        if launched.identity is not None:
            self.launcher.forget(launched.identity)
        if worker.launched is not launched:
            return  # a newer process replaced this one
        await self._carry_out(worker, worker.life.exited(self.clock.monotonic(), code))

    async def _ask_shutdown(self, worker: ManagedWorker, ask: AskShutdown) -> None:
        accepted = await self.client.shutdown(worker.id, ask.address, ask.grace)
        now = self.clock.monotonic()
        await self._carry_out(worker, worker.life.shutdown_answered(now, accepted, ask.grace))

    async def _timer(self, worker: ManagedWorker) -> None:
        """Tick the worker's lifecycle when its next deadline comes (restart, timeouts)."""
        while not worker.gone.is_set():
            worker.rearm.clear()
            wake = worker.life.wake_at()
            delay = None if wake is None else wake - self.clock.monotonic()
            if delay is None or delay > 0:
                await self._sleep_or_rearm(worker, delay)
                continue
            await self._carry_out(worker, worker.life.tick(self.clock.monotonic()))

    async def _sleep_or_rearm(self, worker: ManagedWorker, delay: float | None) -> None:
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(worker.rearm.wait())]
        if delay is not None:
            waits.append(asyncio.ensure_future(self.clock.sleep(delay)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def _remove(self, worker: ManagedWorker) -> None:
        if self.workers.get(worker.id) is worker:
            del self.workers[worker.id]
        worker.gone.set()
        worker.rearm.set()

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- what workers tell us ---------------------------------------------

    async def report_ready(
        self, worker_id: str, address: str, pid: int, load_error: str
    ) -> ManagedWorker:
        worker = self.get(worker_id)
        ident = worker.identity
        if ident is not None and pid and pid != ident.pid:
            raise Conflict(f"worker {worker_id} runs as pid {ident.pid}, not {pid}")
        now = self.clock.monotonic()
        if load_error:
            actions = worker.life.load_failed(now, load_error)
        else:
            actions = worker.life.ready(now, address)
            worker.last_activity = self.clock.time()
        await self._carry_out(worker, actions)
        return worker

    def report_loading(self, worker_id: str, pid: int, progress: float, detail: str) -> None:
        worker = self.get(worker_id)
        ident = worker.identity
        if ident is not None and pid and pid != ident.pid:
            raise Conflict(f"worker {worker_id} runs as pid {ident.pid}, not {pid}")
        if worker.life.phase is not Phase.LOADING:
            return  # a late report after ready or failure: nothing to say any more
        worker.load_progress = min(max(progress, 0.0), 1.0)
        worker.status_detail = detail
        self.on_change()

    # ---- stopping ---------------------------------------------------------

    async def stop(
        self, worker_id: str, force: bool = False, grace: float | None = None
    ) -> ManagedWorker:
        """Stop the worker's process group and drop its row; returns when the process is gone."""
        worker = self.get(worker_id)
        await self._carry_out(worker, worker.life.stop(self.clock.monotonic(), force, grace))
        await worker.gone.wait()
        return worker

    async def stop_all(self, grace: float | None = None) -> None:
        await asyncio.gather(
            *(self.stop(wid, grace=grace) for wid in list(self.workers)), return_exceptions=True
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()

    # ---- health -----------------------------------------------------------

    async def monitor_forever(self) -> None:
        while True:
            try:
                await self.monitor_once()
            except Exception:
                # The monitor must never die silently: log and keep going.
                log.exception("monitor step failed")
            await self.clock.sleep(self.settings.health_interval)

    async def monitor_once(self) -> None:
        """One round of health checks and status reads of every ready worker."""
        ready = [w for w in self.workers.values() if w.life.phase in READY and w.life.address]
        await asyncio.gather(*(self._check(w) for w in ready))

    async def _check(self, worker: ManagedWorker) -> None:
        address, timeout = worker.life.address, self.settings.health_timeout
        ok, error = await self.client.check(worker.id, address, timeout)
        status = await self.client.status(worker.id, address, timeout) if ok else None
        if worker.life.address != address:
            return  # a different process now: this answer is about the old one
        now = self.clock.monotonic()
        actions = worker.life.health_checked(now, ok, error)
        if status is not None and not actions:
            worker.requests_completed = status.requests_completed
            worker.requests_failed = status.requests_failed
            if status.HasField("prefix_cache"):
                worker.prefix_cache = status.prefix_cache
            # Only requests count as activity: health checks and GetStatus never move it.
            worker.last_activity = max(worker.last_activity, float(status.last_activity.seconds))
            busy = status.state == common_pb2.WORKER_STATE_BUSY
            idle_for = self.clock.time() - worker.last_activity
            actions = worker.life.status(now, busy, idle_for, keep=worker.keep)
        await self._carry_out(worker, actions)

    # ---- persistence ------------------------------------------------------

    def _changed(self) -> None:
        self._save()
        self.on_change()

    def _save(self) -> str:
        """Write the table if it changed; returns why it could not be ('' if it could)."""
        rows = [self._row(w) for w in self.workers.values()]
        if rows == self._persisted:
            return self.persist_error
        try:
            self.store.save(rows)
        except OSError as exc:
            error = f"cannot save the worker table {self.store.path}: {exc.strerror or exc}"
            if error != self.persist_error:
                log.error("cannot save the worker table", path=str(self.store.path), error=str(exc))
            self.persist_error, self._persist_errno = error, exc.errno or 0
            return error
        if self.persist_error:
            log.info("worker table saved again", path=str(self.store.path))
        self._persisted, self.persist_error = rows, ""
        return ""

    def _row(self, worker: ManagedWorker) -> WorkerRow:
        life, ident = worker.life, worker.identity
        phase = life.phase
        # BUSY and IDLE flip often and do not matter after a restart: do not rewrite for them.
        state = {Phase.BUSY: "IDLE", Phase.RESTART_PENDING: "FAILED"}.get(phase, phase.value)
        return WorkerRow(
            id=worker.id,
            model=worker.spec.model,
            backend=worker.spec.backend,
            slots=worker.spec.slots,
            device=worker.spec.device,
            backend_options=dict(worker.spec.backend_options),
            restart_policy=int(life.policy),
            tags=list(worker.spec.tags),
            pid=ident.pid if ident else 0,
            create_time=ident.create_time if ident else 0.0,
            address=life.address,
            state=state,
            started_at=worker.started_at,
            restart_count=life.restart_count,
            failure_reason=life.failure_reason,
            restart_pending=life.restart_at is not None,
            keep=worker.keep,
        )

    # ---- adoption after a hive restart --------------------------------------

    async def adopt(self) -> None:
        """After a hive restart: take back live, healthy workers; kill or restart the rest.

        Workers the table does not name (it was unreadable, or a row was) are found by their
        markers and adopted too: none is orphaned, and none started twice.
        """
        try:
            rows = self.store.load()
        except TableUnreadable as exc:
            log.error(
                "worker table unreadable; recovering workers from the process table",
                path=str(exc.path),
                saved_as=str(exc.saved_as or "(could not be moved)"),
                error=exc.reason,
            )
            rows = []
        rows += self._recovered({row.id for row in rows})
        await asyncio.gather(*(self._adopt_row(row) for row in rows))
        self._changed()

    def _recovered(self, known: set[str]) -> list[WorkerRow]:
        """Rows rebuilt from live worker processes of this hive id that `known` lacks."""
        rows = []
        for found in self.launcher.own_workers():
            if found.worker_id in known:
                continue
            try:
                spec = json.loads(found.spec) if found.spec else {}
                row = WorkerRow.from_json(
                    {
                        **(spec if isinstance(spec, dict) else {}),
                        "id": found.worker_id,
                        "pid": found.identity.pid,
                        "create_time": found.identity.create_time,
                        "address": found.address,
                        "state": "IDLE" if found.address else "LOADING",
                    }
                )
            except ValueError as exc:
                log.error("cannot recover worker", worker_id=found.worker_id, error=str(exc))
                continue
            log.warning("recovered worker from the process table", worker_id=row.id, pid=row.pid)
            rows.append(row)
        return rows

    def _restore(self, row: WorkerRow) -> ManagedWorker:
        spec = WorkerSpec(
            model=row.model,
            backend=row.backend,
            slots=row.slots,
            device=row.device,
            backend_options=row.backend_options,
            restart_policy=row.restart_policy,  # type: ignore[arg-type]
            tags=row.tags,
        )
        worker = self._new_worker(row.id, spec, keep=row.keep)
        worker.life.restore(row.address, row.restart_count, row.failure_reason)
        worker.started_at = row.started_at
        return worker

    async def _adopt_row(self, row: WorkerRow) -> None:
        ident = ProcessIdentity(row.pid, row.create_time) if row.pid else None
        alive = ident is not None and self.launcher.owns(ident, row.id)
        plan = adoption(row.state, alive, bool(row.address))
        if plan is Adoption.KILL_AND_DROP:
            if alive and ident is not None:
                await self._kill(ident)
            return
        worker = self._restore(row)
        now = self.clock.monotonic()
        if plan is Adoption.RESTORE_FAILED:
            await self._carry_out(worker, worker.life.failed_before(now, row.restart_pending))
            return
        if plan is Adoption.GONE or ident is None:
            reason = "process was gone when the hive restarted"
            await self._carry_out(worker, worker.life.not_adopted(now, reason))
            return
        reason = row.failure_reason or "not in a state to adopt after the hive restarted"
        if plan is Adoption.CHECK_HEALTH:
            ok, error = await self.client.check(row.id, row.address, self.settings.health_timeout)
            if ok:
                await self._attach(worker, ident, ready=True)
                return
            reason = f"did not answer health checks after the hive restarted: {error}"
        elif plan is Adoption.ADOPT_LOADING:
            await self._attach(worker, ident, ready=False)
            return
        await self._kill(ident)
        await self._carry_out(worker, worker.life.not_adopted(self.clock.monotonic(), reason))

    async def _attach(self, worker: ManagedWorker, ident: ProcessIdentity, ready: bool) -> None:
        """Take over a live process we did not start: watched through a pidfd from now on."""
        worker.launched = Launched(ident)
        worker.last_activity = self.clock.time()
        self._track(self._watch(worker, worker.launched))
        await self._carry_out(worker, worker.life.adopted(self.clock.monotonic(), ready))

    async def _kill(self, ident: ProcessIdentity) -> None:
        self.launcher.signal_group(ident, signal.SIGKILL)
        await self.launcher.wait_gone(ident)


__all__ = [
    "Conflict",
    "ManagedWorker",
    "RestartSettings",
    "Supervisor",
    "SupervisorSettings",
    "WorkerNotFound",
    "WorkerSpec",
]
