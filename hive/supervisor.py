"""The hive's worker table: carries out what each worker's lifecycle (hive/states.py) decides.

The supervisor feeds every event it sees into the worker's `Lifecycle` (a process
started or ended, a ready callback, a health check, time passing, a stop request)
and carries out the actions that come back: launch a process, ask it to shut down,
signal it, persist the table, heartbeat now, drop the row. It decides nothing
itself; the OS is behind `Launcher`, the workers' RPCs behind `WorkerClient`, rows on
disk behind hive/store.py. Others feed it events: hive/adoption.py (the workers an
earlier hive process left running), hive/monitor.py (reports, health checks, samples)
and hive/boot.py (the --spawn counts kept).
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from apiary.clock import Clock, SystemClock
from apiary.protoutil import naming
from apiary.security import Security, tls_args
from hive.launcher import Launched, Launcher
from hive.managed import ManagedWorker
from hive.policy import DEFAULT_POLICY, RestartTracker
from hive.spec import WorkerSpec
from hive.states import (
    Action,
    AskShutdown,
    CountCrash,
    ForgetAddress,
    Launch,
    Lifecycle,
    LifecycleSettings,
    Log,
    Persist,
    Remove,
    Report,
    Signal,
)
from hive.store import SavedTable, WorkerStore, spec_json, worker_row
from hive.worker_client import WorkerClient
from protos.v1 import common_pb2

log = structlog.get_logger("hive.supervisor")


class WorkerNotFound(KeyError):
    pass


@dataclass
class SupervisorSettings:
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    health_interval: float = 5.0
    health_timeout: float = 2.0
    default_policy: common_pb2.RestartPolicy.ValueType = DEFAULT_POLICY
    worker_host: str = "127.0.0.1"
    # A worker stops by itself after this long without its hive asking after it (0 = never).
    orphan_timeout: float = 60.0


class Supervisor:
    """Every worker of this hive, each carried through its lifecycle's actions."""

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
        self.table = SavedTable(store)
        # Called when a kept worker that failed for good has its row expire (hive/boot.py).
        self.on_kept_expired: Callable[[], Coroutine[Any, Any, None]] | None = None

    @property
    def persist_error(self) -> str:
        """Why the table could not be saved last time ('' when it could): heartbeats carry it."""
        return self.table.error

    def get(self, worker_id: str) -> ManagedWorker:
        try:
            return self.workers[worker_id]
        except KeyError:
            raise WorkerNotFound(
                f"hive {self.hive_id} has no worker {worker_id!r}; "
                f"its workers: {naming(self.workers)}"
            ) from None

    # ---- the table --------------------------------------------------------

    def add(self, worker_id: str, spec: WorkerSpec, keep: bool = False) -> ManagedWorker:
        """A new row, its timer running; its lifecycle has not started (spawn or adoption)."""
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
        worker = self.add(f"w-{uuid.uuid4().hex[:12]}", spec, keep)
        if self._save():  # the row first: a process nobody recorded would be orphaned
            self._remove(worker)
            self._save()
            raise self.table.refusal(f"worker {worker.id} was not started")
        await self.carry_out(worker, worker.life.start(self.clock.monotonic()))
        if self.persist_error and worker.alive():
            await self.stop(worker.id, force=True)
            raise self.table.refusal(f"worker {worker.id} was stopped: it could not be recorded")
        return worker

    # ---- carrying out actions ---------------------------------------------

    async def carry_out(self, worker: ManagedWorker, actions: Iterable[Action]) -> None:
        """Do what the worker's lifecycle decided, in order."""
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
                if action.expired and worker.keep and self.on_kept_expired is not None:
                    self._track(self.on_kept_expired())  # a kept worker failed for good
            elif isinstance(action, ForgetAddress):
                self.client.forget(action.address)
            elif isinstance(action, CountCrash):
                self.crashes += 1
            elif isinstance(action, Log):
                getattr(log, action.level)(action.event, worker_id=worker.id, **dict(action.fields))
        if worker.life.settled:
            worker.settled.set()
        worker.rearm.set()
        if changed:
            self.changed()

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
            await self.carry_out(worker, failed)
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
        self.watch(worker, launched)
        await self.carry_out(worker, worker.life.launched(self.clock.monotonic()))

    def worker_argv(self, worker: ManagedWorker) -> list[str]:
        """Who the worker is, where its hive is, its spec; its credential goes in its env."""
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

    def watch(self, worker: ManagedWorker, launched: Launched) -> None:
        """From now on, the process's exit is fed to the worker's lifecycle."""
        self._track(self._watch(worker, launched))

    async def _watch(self, worker: ManagedWorker, launched: Launched) -> None:
        """Await the process: its exit is seen the moment it happens (and a child is reaped)."""
        code = await self.launcher.wait_exit(launched)
        if launched.identity is not None:
            self.launcher.forget(launched.identity)
        if worker.launched is not launched:
            return  # a newer process replaced this one
        await self.carry_out(worker, worker.life.exited(self.clock.monotonic(), code))

    async def _ask_shutdown(self, worker: ManagedWorker, ask: AskShutdown) -> None:
        accepted = await self.client.shutdown(worker.id, ask.address, ask.grace)
        now = self.clock.monotonic()
        await self.carry_out(worker, worker.life.shutdown_answered(now, accepted, ask.grace))

    async def _timer(self, worker: ManagedWorker) -> None:
        """Tick the worker's lifecycle when its next deadline comes (restart, timeouts)."""
        while not worker.gone.is_set():
            if await worker.until_due(self.clock):
                await self.carry_out(worker, worker.life.tick(self.clock.monotonic()))

    def _remove(self, worker: ManagedWorker) -> None:
        if self.workers.get(worker.id) is worker:
            del self.workers[worker.id]
        worker.gone.set()
        worker.rearm.set()

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- stopping ---------------------------------------------------------

    async def stop(
        self, worker_id: str, force: bool = False, grace: float | None = None
    ) -> ManagedWorker:
        """Stop the worker's process group and drop its row; returns when the process is gone."""
        worker = self.get(worker_id)
        await self.carry_out(worker, worker.life.stop(self.clock.monotonic(), force, grace))
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

    # ---- persistence ------------------------------------------------------

    def changed(self) -> None:
        """The table changed: save it, and heartbeat now."""
        self._save()
        self.on_change()

    def _save(self) -> str:
        """Write the table if it changed; returns why it could not be ('' if it could)."""
        return self.table.save([worker_row(w) for w in self.workers.values()])
