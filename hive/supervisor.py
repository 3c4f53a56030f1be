"""The hive's worker table: spawns worker processes, watches them, restarts or retires them.

States (protos WorkerState) and who moves them:
  LOADING  -> IDLE      ready callback (ReportReady) from the worker
  LOADING  -> FAILED    load error reported, exit before ready, or load timeout
  IDLE     <-> BUSY     the worker's own status, read by the health monitor
  IDLE/BUSY -> FAILED   the process exited unasked, or failed 3 health checks in a row
  FAILED   -> LOADING   the restart policy relaunched it (same id, new process)
  any      -> STOPPING  StopWorker, idle retirement, hive shutdown; the row goes when the
                        process is gone
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

from apiary.clock import Clock, SystemClock
from apiary.protoutil import naming, state_name, timestamp
from apiary.security import Security, tls_args
from hive.launcher import Launcher, ProcessIdentity
from hive.policy import (
    DEFAULT_POLICY,
    HealthTracker,
    RestartSettings,
    RestartTracker,
    idle_expired,
    loading_expired,
)
from hive.store import WorkerStore
from hive.worker_client import WorkerClient
from protos.v1 import common_pb2, queen_pb2

log = structlog.get_logger("hive.supervisor")

S = common_pb2
WORKER_ID_ENV = "APIARY_WORKER_ID"
WORKER_TOKEN_ENV = "APIARY_WORKER_TOKEN"
READY = (S.WORKER_STATE_IDLE, S.WORKER_STATE_BUSY)


class WorkerNotFound(KeyError):
    pass


class WorkerConflict(Exception):
    """The worker is not in a state where the call makes sense."""


@dataclass
class SupervisorSettings:
    # Graceful stop: the worker's own drain time after a Shutdown request.
    stop_grace: float = 10.0
    # After SIGTERM, how long before SIGKILL.
    term_grace: float = 3.0
    health_interval: float = 5.0
    health_timeout: float = 2.0
    health_failures: int = 3
    load_timeout: float = 120.0
    # 0 = never retire idle workers.
    idle_timeout: float = 300.0
    restart: RestartSettings = field(default_factory=RestartSettings)
    default_policy: common_pb2.RestartPolicy.ValueType = DEFAULT_POLICY
    worker_host: str = "127.0.0.1"


@dataclass
class WorkerSpec:
    model: str
    backend: str
    slots: int = 1
    device: str = "cpu"
    backend_options: dict[str, str] = field(default_factory=dict)
    restart_policy: common_pb2.RestartPolicy.ValueType = S.RESTART_POLICY_UNSPECIFIED
    tags: list[str] = field(default_factory=list)

    def same_as(self, other: WorkerSpec) -> bool:
        def key(spec: WorkerSpec) -> tuple[object, ...]:
            options = sorted(spec.backend_options.items())
            return (spec.model, spec.backend, spec.slots, spec.device, options, sorted(spec.tags))

        return key(self) == key(other)


@dataclass
class ManagedWorker:
    id: str
    spec: WorkerSpec
    state: common_pb2.WorkerState.ValueType = S.WORKER_STATE_LOADING
    process: asyncio.subprocess.Process | None = None
    identity: ProcessIdentity | None = None
    ps: psutil.Process | None = None
    address: str = ""
    log_path: Path | None = None
    started_at: float = 0.0  # wall clock, for display
    loading_since: float = 0.0  # monotonic
    last_activity: float = 0.0  # wall clock: last request, or ready time
    failure_reason: str = ""
    restart_count: int = 0
    requests_completed: int = 0
    requests_failed: int = 0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    restart_at: float | None = None  # monotonic
    load_progress: float = 0.0
    status_detail: str = ""
    restart_task: asyncio.Task[None] | None = None
    health: HealthTracker = field(default_factory=HealthTracker)
    restarts: RestartTracker = field(default_factory=RestartTracker)
    # Set when the worker is ready or has failed: what SpawnWorker(wait_ready) waits on.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def policy(self) -> common_pb2.RestartPolicy.ValueType:
        return self.spec.restart_policy

    def alive(self) -> bool:
        return self.identity is not None and not self.exited.is_set()


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (status unknown: the worker was adopted after a hive restart)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


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
        self.launcher = launcher or Launcher()
        self.client = client or WorkerClient()
        self.clock = clock or SystemClock()
        self.on_change = on_change
        self.workers: dict[str, ManagedWorker] = {}
        self.spawns = 0
        self.crashes = 0
        self.restarts_done = 0
        self.started = self.clock.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._persisted: list[dict[str, Any]] | None = None
        self._closing = False

    # ---- views ------------------------------------------------------------

    def record(self, worker: ManagedWorker) -> common_pb2.WorkerRecord:
        restart_in = 0.0
        if worker.restart_at is not None:
            restart_in = max(worker.restart_at - self.clock.monotonic(), 0.0)
        ready = worker.state in READY
        return common_pb2.WorkerRecord(
            id=worker.id,
            hive_id=self.hive_id,
            address=worker.address,
            model=worker.spec.model,
            backend=worker.spec.backend,
            device=worker.spec.device,
            state=worker.state,
            slots_total=worker.spec.slots,
            slots_available=worker.spec.slots if worker.state == S.WORKER_STATE_IDLE else 0,
            pid=worker.identity.pid if worker.identity and worker.alive() else 0,
            started_at=timestamp(worker.started_at),
            last_activity=timestamp(worker.last_activity if ready else 0.0),
            requests_completed=worker.requests_completed,
            requests_failed=worker.requests_failed,
            failure_reason=worker.failure_reason,
            backend_options=worker.spec.backend_options,
            restart_policy=worker.policy,
            restart_count=worker.restart_count,
            cpu_percent=worker.cpu_percent,
            rss_bytes=worker.rss_bytes,
            health_failures=worker.health.failures,
            restart_in_seconds=restart_in,
            tags=worker.spec.tags,
            load_progress=worker.load_progress if worker.state == S.WORKER_STATE_LOADING else 0.0,
            status_detail=worker.status_detail if worker.state == S.WORKER_STATE_LOADING else "",
        )

    def records(self) -> list[common_pb2.WorkerRecord]:
        return [self.record(w) for w in self.workers.values()]

    def stats(self) -> queen_pb2.HiveStats:
        return queen_pb2.HiveStats(
            spawns=self.spawns,
            crashes=self.crashes,
            restarts=self.restarts_done,
            uptime_seconds=self.clock.monotonic() - self.started,
        )

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
            if worker.ps is None or not worker.alive():
                worker.cpu_percent, worker.rss_bytes = 0.0, 0
                continue
            try:
                with worker.ps.oneshot():
                    worker.cpu_percent = worker.ps.cpu_percent(None)
                    worker.rss_bytes = worker.ps.memory_info().rss
            except psutil.Error:
                worker.cpu_percent, worker.rss_bytes = 0.0, 0

    # ---- spawning ---------------------------------------------------------

    def worker_argv(self, worker: ManagedWorker) -> list[str]:
        spec = worker.spec
        argv = [
            sys.executable,
            "-m",
            "worker",
            "--worker-id",
            worker.id,
            "--hive-id",
            self.hive_id,
            "--hive",
            self.hive_address,
            "--model",
            spec.model,
            "--backend",
            spec.backend,
            "--device",
            spec.device,
            "--slots",
            str(spec.slots),
            "--listen",
            f"{self.settings.worker_host}:0",
            "--stop-grace",
            str(self.settings.stop_grace),
        ]
        for key, value in sorted(spec.backend_options.items()):
            argv += ["--option", f"{key}={value}"]
        return argv + tls_args(self.security.tls)

    async def spawn(self, spec: WorkerSpec) -> ManagedWorker:
        if spec.restart_policy == S.RESTART_POLICY_UNSPECIFIED:
            spec.restart_policy = self.settings.default_policy
        worker = ManagedWorker(
            id=f"w-{uuid.uuid4().hex[:12]}",
            spec=spec,
            health=HealthTracker(self.settings.health_failures),
            restarts=RestartTracker(self.settings.restart),
        )
        worker.log_path = self.store.state_dir / "logs" / f"{worker.id}.log"
        self.workers[worker.id] = worker
        await self._launch(worker)
        return worker

    async def ensure(self, spec: WorkerSpec, count: int) -> None:
        """Have `count` workers of `spec` (boot-time --spawn): re-adopted ones count."""
        have = sum(
            1
            for w in self.workers.values()
            if w.spec.same_as(spec) and w.state != S.WORKER_STATE_STOPPING
        )
        for _ in range(count - have):
            await self.spawn(WorkerSpec(**vars(spec)))

    async def _launch(self, worker: ManagedWorker) -> None:
        """Start (or restart) the worker's process. FAILED -> LOADING on restart."""
        worker.state = S.WORKER_STATE_LOADING
        worker.address = ""
        worker.failure_reason = ""
        worker.load_progress, worker.status_detail = 0.0, "starting"
        worker.restart_at = None
        worker.settled = asyncio.Event()
        worker.exited = asyncio.Event()
        worker.health = HealthTracker(self.settings.health_failures)
        worker.started_at = self.clock.time()
        worker.loading_since = self.clock.monotonic()
        env = dict(os.environ)
        # The marker by which a hive finds Apiary workers among all processes.
        env[WORKER_ID_ENV] = worker.id
        if self.security.tokens.worker:
            env[WORKER_TOKEN_ENV] = self.security.tokens.worker
        assert worker.log_path is not None
        try:
            worker.process, worker.identity = await self.launcher.start(
                self.worker_argv(worker), env, worker.log_path
            )
        except OSError as exc:
            worker.process, worker.identity = None, None
            worker.state = S.WORKER_STATE_FAILED
            worker.failure_reason = f"could not start process: {exc}"
            worker.settled.set()
            worker.exited.set()
            self._changed()
            return
        self.spawns += 1
        worker.ps = self._ps(worker.identity)
        worker.restarts.started(self.clock.monotonic())
        log.info(
            "worker spawned",
            worker_id=worker.id,
            pid=worker.process.pid,
            model=worker.spec.model,
            log=str(worker.log_path),
        )
        self._track(self._watch(worker, worker.exited))
        self._changed()

    def _ps(self, ident: ProcessIdentity | None) -> psutil.Process | None:
        if ident is None:
            return None
        try:
            proc = psutil.Process(ident.pid)
            proc.cpu_percent(None)  # prime: the first reading is always 0
            return proc
        except psutil.Error:
            return None

    def _track(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- exits and restarts ----------------------------------------------

    async def _watch(self, worker: ManagedWorker, exited: asyncio.Event) -> None:
        """Await the process: its exit is seen the moment it happens (and a child is reaped)."""
        code: int | None = None
        if worker.process is not None:
            code = await worker.process.wait()
        elif worker.identity is not None:
            await self.launcher.wait_gone(worker.identity)
        if exited is not worker.exited:  # a newer incarnation replaced this one
            return
        self._on_exit(worker, code)

    def _on_exit(self, worker: ManagedWorker, code: int | None) -> None:
        if worker.state == S.WORKER_STATE_STOPPING:
            log.info("worker stopped", worker_id=worker.id, exit=describe_exit(code))
        else:
            # LOADING/IDLE/BUSY -> FAILED: nobody asked it to exit (or we killed it as unhealthy).
            self.crashes += 1
            worker.state = S.WORKER_STATE_FAILED
            worker.failure_reason = worker.failure_reason or describe_exit(code)
            log.warning("worker failed", worker_id=worker.id, reason=worker.failure_reason)
            if not self._closing:
                self._decide_restart(worker, clean_exit=code == 0)
        worker.address = ""
        worker.cpu_percent, worker.rss_bytes = 0.0, 0
        worker.settled.set()
        worker.exited.set()
        self._changed()

    def _decide_restart(self, worker: ManagedWorker, clean_exit: bool) -> None:
        now = self.clock.monotonic()
        decision = worker.restarts.failed(now, worker.policy, clean_exit)
        if not decision.restart:
            worker.failure_reason = f"{worker.failure_reason}; {decision.reason}"
            log.warning("worker will not be restarted", worker_id=worker.id, reason=decision.reason)
            return
        worker.restart_at = now + decision.delay
        worker.restart_task = self._track(self._restart_later(worker, decision.delay))
        log.info("worker restart scheduled", worker_id=worker.id, delay=round(decision.delay, 2))

    async def _restart_later(self, worker: ManagedWorker, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.workers.get(worker.id) is not worker or worker.state != S.WORKER_STATE_FAILED:
            return
        worker.restart_count += 1
        self.restarts_done += 1
        worker.restart_task = None
        await self._launch(worker)

    async def fail_and_kill(self, worker: ManagedWorker, reason: str) -> None:
        """Unhealthy or stuck: stop routing at once, kill it, then let the restart policy decide."""
        if worker.state in (S.WORKER_STATE_FAILED, S.WORKER_STATE_STOPPING):
            return
        worker.state = S.WORKER_STATE_FAILED
        worker.failure_reason = reason
        log.warning("killing worker", worker_id=worker.id, reason=reason)
        self._changed()
        await self._terminate(worker, force=False, grace=0.0)

    # ---- ready ------------------------------------------------------------

    def report_ready(
        self, worker_id: str, address: str, pid: int, load_error: str
    ) -> ManagedWorker:
        worker = self.get(worker_id)
        if worker.identity and pid and pid != worker.identity.pid:
            raise WorkerConflict(f"worker {worker_id} runs as pid {worker.identity.pid}, not {pid}")
        if worker.state != S.WORKER_STATE_LOADING:
            raise WorkerConflict(f"worker {worker_id} is {state_name(worker.state)}, not LOADING")
        if load_error:
            # LOADING -> FAILED: the backend could not load; the process exits next.
            worker.state = S.WORKER_STATE_FAILED
            worker.failure_reason = load_error
        else:
            # LOADING -> IDLE: ready callback.
            worker.state = S.WORKER_STATE_IDLE
            worker.address = address
            worker.last_activity = self.clock.time()
        log.info("worker reported", worker_id=worker_id, address=address, load_error=load_error)
        worker.settled.set()
        self._changed()
        return worker

    def report_loading(self, worker_id: str, pid: int, progress: float, detail: str) -> None:
        worker = self.get(worker_id)
        if worker.identity and pid and pid != worker.identity.pid:
            raise WorkerConflict(f"worker {worker_id} runs as pid {worker.identity.pid}, not {pid}")
        if worker.state != S.WORKER_STATE_LOADING:
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
        grace = self.settings.stop_grace if grace is None or grace <= 0 else grace
        if worker.restart_task is not None:
            worker.restart_task.cancel()
            worker.restart_task = None
        worker.restart_at = None
        if worker.alive():
            worker.state = S.WORKER_STATE_STOPPING
            self._changed()
            await self._terminate(worker, force, grace)
        if self.workers.get(worker_id) is worker:
            del self.workers[worker_id]
        self._changed()
        return worker

    async def _terminate(self, worker: ManagedWorker, force: bool, grace: float) -> None:
        """Shutdown request, then SIGTERM, then SIGKILL, each only if the last did not work."""
        ident = worker.identity
        exited = worker.exited
        if ident is None:
            await exited.wait()
            return
        if not force:
            if grace > 0 and worker.address and await self.client.shutdown(worker.address, grace):
                if await self._exits_within(exited, grace + 1.0):
                    return
            self.launcher.signal_group(ident, signal.SIGTERM)
            if await self._exits_within(exited, self.settings.term_grace):
                return
            log.warning("worker ignored SIGTERM; killing", worker_id=worker.id)
        self.launcher.signal_group(ident, signal.SIGKILL)
        await exited.wait()

    @staticmethod
    async def _exits_within(exited: asyncio.Event, seconds: float) -> bool:
        try:
            await asyncio.wait_for(exited.wait(), seconds)
            return True
        except TimeoutError:
            return False

    async def stop_all(self, grace: float | None = None) -> None:
        self._closing = True
        await asyncio.gather(
            *(self.stop(wid, grace=grace) for wid in list(self.workers)), return_exceptions=True
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()

    # ---- monitoring -------------------------------------------------------

    async def monitor_forever(self) -> None:
        while True:
            try:
                await self.monitor_once()
            except Exception:
                # The monitor must never die silently: log and keep going.
                log.exception("monitor step failed")
            await asyncio.sleep(self.settings.health_interval)

    async def monitor_once(self) -> None:
        """One round of health checks, load timeouts and idle retirement."""
        await asyncio.gather(*(self._check(w) for w in list(self.workers.values())))

    async def _check(self, worker: ManagedWorker) -> None:
        s = self.settings
        if worker.state == S.WORKER_STATE_LOADING and worker.alive():
            if loading_expired(worker.loading_since, self.clock.monotonic(), s.load_timeout):
                self._track(
                    self.fail_and_kill(
                        worker, f"still LOADING after {s.load_timeout:g}s (load timeout)"
                    )
                )
            return
        if worker.state not in READY or not worker.address:
            return
        ok, error = await self.client.check(worker.address, s.health_timeout)
        status = await self.client.status(worker.address, s.health_timeout) if ok else None
        if worker.state not in READY:  # changed while we were asking
            return
        if worker.health.record(ok, error):
            self._track(
                self.fail_and_kill(
                    worker, f"failed {worker.health.failures} health checks in a row: {error}"
                )
            )
            return
        if status is not None:
            before = worker.state
            worker.state = (
                S.WORKER_STATE_BUSY if status.state == S.WORKER_STATE_BUSY else S.WORKER_STATE_IDLE
            )
            worker.requests_completed = status.requests_completed
            worker.requests_failed = status.requests_failed
            # Only requests count as activity: health checks and GetStatus never move it.
            worker.last_activity = max(worker.last_activity, float(status.last_activity.seconds))
            if worker.state != before:
                self._changed()
        if worker.state == S.WORKER_STATE_IDLE and idle_expired(
            worker.last_activity, self.clock.time(), s.idle_timeout
        ):
            log.info("retiring idle worker", worker_id=worker.id, idle_timeout=s.idle_timeout)
            self._track(self.stop(worker.id))

    # ---- persistence and adoption ----------------------------------------

    def _row(self, worker: ManagedWorker) -> dict[str, Any]:
        return {
            "id": worker.id,
            "model": worker.spec.model,
            "backend": worker.spec.backend,
            "slots": worker.spec.slots,
            "device": worker.spec.device,
            "backend_options": worker.spec.backend_options,
            "restart_policy": int(worker.policy),
            "tags": worker.spec.tags,
            "pid": worker.identity.pid if worker.identity else 0,
            "create_time": worker.identity.create_time if worker.identity else 0.0,
            "address": worker.address,
            "state": state_name(worker.state),
            "started_at": worker.started_at,
            "restart_count": worker.restart_count,
            "failure_reason": worker.failure_reason,
            "restart_pending": worker.restart_at is not None,
        }

    def _changed(self) -> None:
        rows = [self._row(w) for w in self.workers.values()]
        # BUSY and IDLE flip often and do not matter after a restart: do not rewrite for them.
        for row in rows:
            if row["state"] == "BUSY":
                row["state"] = "IDLE"
        if rows != self._persisted:
            try:
                self.store.save(rows)
                self._persisted = rows
            except OSError as exc:
                log.error("cannot save worker table", path=str(self.store.path), error=str(exc))
        self.on_change()

    async def adopt(self) -> None:
        """After a hive restart: take back live, healthy workers; kill or restart the rest."""
        rows = self.store.load()
        await asyncio.gather(*(self._adopt_row(row) for row in rows), return_exceptions=False)
        self._changed()

    async def _adopt_row(self, row: dict[str, Any]) -> None:
        try:
            spec = WorkerSpec(
                model=str(row["model"]),
                backend=str(row["backend"]),
                slots=int(row["slots"]),
                device=str(row["device"]),
                backend_options={str(k): str(v) for k, v in dict(row["backend_options"]).items()},
                restart_policy=int(row["restart_policy"]),  # type: ignore[arg-type]
                tags=[str(t) for t in row.get("tags", [])],
            )
            worker = ManagedWorker(
                id=str(row["id"]),
                spec=spec,
                address=str(row["address"]),
                started_at=float(row["started_at"]),
                restart_count=int(row["restart_count"]),
                failure_reason=str(row["failure_reason"]),
                health=HealthTracker(self.settings.health_failures),
                restarts=RestartTracker(self.settings.restart),
            )
            ident = (
                ProcessIdentity(int(row["pid"]), float(row["create_time"])) if row["pid"] else None
            )
            saved_state = str(row["state"])
            restart_pending = bool(row.get("restart_pending"))
        except (KeyError, TypeError, ValueError) as exc:
            log.error("skipping unreadable row in worker table", error=str(exc))
            return
        worker.log_path = self.store.state_dir / "logs" / f"{worker.id}.log"
        worker.identity = ident
        alive = ident is not None and self.launcher.matches(ident)
        self.workers[worker.id] = worker
        bound = log.bind(worker_id=worker.id, pid=ident.pid if ident else 0)

        if alive and saved_state in ("IDLE", "BUSY") and worker.address:
            ok, error = await self.client.check(worker.address, self.settings.health_timeout)
            if ok:
                worker.state = S.WORKER_STATE_IDLE
                worker.last_activity = self.clock.time()
                self._adopt_process(worker)
                bound.info("re-adopted worker", address=worker.address)
                return
            bound.warning("live worker does not answer health checks; killing it", error=error)
            worker.failure_reason = (
                f"did not answer health checks after the hive restarted: {error}"
            )
        elif alive and saved_state == "LOADING":
            # It will call ReportReady on us, or run into the load timeout.
            worker.state = S.WORKER_STATE_LOADING
            worker.loading_since = self.clock.monotonic()
            self._adopt_process(worker)
            bound.info("re-adopted loading worker")
            return
        elif saved_state == "STOPPING":
            if alive and ident is not None:
                self.launcher.signal_group(ident, signal.SIGKILL)
            del self.workers[worker.id]
            return
        elif saved_state == "FAILED" and not alive:
            worker.state = S.WORKER_STATE_FAILED
            worker.identity = None
            worker.settled.set()
            worker.exited.set()
            if restart_pending:
                self._decide_restart(worker, clean_exit=False)
            return
        elif not alive:
            worker.failure_reason = "process was gone when the hive restarted"

        # Not adoptable: make sure it is dead, then treat it as a failure.
        if alive and ident is not None:
            self.launcher.signal_group(ident, signal.SIGKILL)
            await self.launcher.wait_gone(ident)
        worker.identity = None
        worker.state = S.WORKER_STATE_FAILED
        worker.settled.set()
        worker.exited.set()
        self.crashes += 1
        bound.warning("worker not adopted", reason=worker.failure_reason)
        self._decide_restart(worker, clean_exit=False)

    def _adopt_process(self, worker: ManagedWorker) -> None:
        worker.process = None  # not our child: watched through a pidfd
        worker.ps = self._ps(worker.identity)
        worker.restarts.started(self.clock.monotonic())
        worker.settled = asyncio.Event()
        worker.exited = asyncio.Event()
        if worker.state in READY:
            worker.settled.set()
        self._track(self._watch(worker, worker.exited))
