"""The hive's worker table: spawns worker processes, sees each exit at once, stops them.

States (protos WorkerState) and who moves them:
  LOADING  -> IDLE      ready callback (ReportReady) from the worker
  LOADING  -> FAILED    the worker reported a load error, or exited before ready
  IDLE     -> FAILED    the process exited without being asked to
  any      -> STOPPING  StopWorker / hive shutdown; the row goes when the process is gone
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from apiary.protoutil import naming, timestamp
from hive.launcher import Launcher, ProcessIdentity
from protos.v1 import common_pb2

log = structlog.get_logger("hive.supervisor")

S = common_pb2
WORKER_ID_ENV = "APIARY_WORKER_ID"


class WorkerNotFound(KeyError):
    pass


class WorkerConflict(Exception):
    """The worker is not in a state where the call makes sense."""


@dataclass
class WorkerSpec:
    model: str
    backend: str
    slots: int = 1
    device: str = "cpu"
    backend_options: dict[str, str] = field(default_factory=dict)


@dataclass
class ManagedWorker:
    id: str
    spec: WorkerSpec
    state: common_pb2.WorkerState.ValueType = S.WORKER_STATE_LOADING
    process: asyncio.subprocess.Process | None = None
    identity: ProcessIdentity | None = None
    address: str = ""
    started_at: float = 0.0
    last_activity: float = 0.0
    failure_reason: str = ""
    exit_code: int | None = None
    # Set when the worker is ready or has failed: what SpawnWorker(wait_ready) waits on.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, hive_id: str) -> common_pb2.WorkerRecord:
        return common_pb2.WorkerRecord(
            id=self.id,
            hive_id=hive_id,
            address=self.address,
            model=self.spec.model,
            backend=self.spec.backend,
            device=self.spec.device,
            state=self.state,
            slots_total=self.spec.slots,
            slots_available=self.spec.slots if self.state == S.WORKER_STATE_IDLE else 0,
            pid=self.identity.pid if self.identity else 0,
            started_at=timestamp(self.started_at),
            last_activity=timestamp(self.last_activity),
            failure_reason=self.failure_reason,
            backend_options=self.spec.backend_options,
        )


def describe_exit(code: int) -> str:
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
        launcher: Launcher | None = None,
        stop_grace: float = 10.0,
        worker_listen_host: str = "127.0.0.1",
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.hive_id = hive_id
        self.hive_address = hive_address
        self.launcher = launcher or Launcher()
        self.stop_grace = stop_grace
        self.worker_listen_host = worker_listen_host
        self.on_change = on_change
        self.workers: dict[str, ManagedWorker] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def records(self) -> list[common_pb2.WorkerRecord]:
        return [w.record(self.hive_id) for w in self.workers.values()]

    def get(self, worker_id: str) -> ManagedWorker:
        try:
            return self.workers[worker_id]
        except KeyError:
            raise WorkerNotFound(
                f"hive {self.hive_id} has no worker {worker_id!r}; "
                f"its workers: {naming(self.workers)}"
            ) from None

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
            f"{self.worker_listen_host}:0",
            "--stop-grace",
            str(max(self.stop_grace - 1.0, 0.5)),
        ]
        for key, value in sorted(spec.backend_options.items()):
            argv += ["--option", f"{key}={value}"]
        return argv

    async def spawn(self, spec: WorkerSpec) -> ManagedWorker:
        worker = ManagedWorker(id=f"w-{uuid.uuid4().hex[:12]}", spec=spec)
        env = dict(os.environ)
        # The marker by which a hive finds Apiary workers among all processes.
        env[WORKER_ID_ENV] = worker.id
        worker.started_at = time.time()
        self.workers[worker.id] = worker
        try:
            worker.process, worker.identity = await self.launcher.start(
                self.worker_argv(worker), env
            )
        except OSError as exc:
            worker.state = S.WORKER_STATE_FAILED
            worker.failure_reason = f"could not start process: {exc}"
            worker.settled.set()
            worker.exited.set()
            self.on_change()
            return worker
        log.info("worker spawned", worker_id=worker.id, pid=worker.process.pid, model=spec.model)
        task = asyncio.create_task(self._watch(worker), name=f"watch-{worker.id}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        self.on_change()
        return worker

    async def _watch(self, worker: ManagedWorker) -> None:
        """Await the child: its exit is seen the moment it happens, and it is reaped."""
        assert worker.process is not None
        code = await worker.process.wait()
        worker.exit_code = code
        if worker.state == S.WORKER_STATE_STOPPING:
            log.info("worker stopped", worker_id=worker.id, exit=describe_exit(code))
        else:
            # LOADING/IDLE -> FAILED: nobody asked it to exit.
            worker.state = S.WORKER_STATE_FAILED
            if not worker.failure_reason:
                worker.failure_reason = describe_exit(code)
            log.warning("worker exited", worker_id=worker.id, reason=worker.failure_reason)
        worker.address = "" if worker.state == S.WORKER_STATE_FAILED else worker.address
        worker.settled.set()
        worker.exited.set()
        self.on_change()

    def report_ready(
        self, worker_id: str, address: str, pid: int, load_error: str
    ) -> ManagedWorker:
        worker = self.get(worker_id)
        if worker.identity and pid and pid != worker.identity.pid:
            raise WorkerConflict(f"worker {worker_id} runs as pid {worker.identity.pid}, not {pid}")
        if worker.state != S.WORKER_STATE_LOADING:
            raise WorkerConflict(
                f"worker {worker_id} is {common_pb2.WorkerState.Name(worker.state)}, not LOADING"
            )
        if load_error:
            # LOADING -> FAILED: the backend could not load; the process exits next.
            worker.state = S.WORKER_STATE_FAILED
            worker.failure_reason = load_error
        else:
            # LOADING -> IDLE: ready callback.
            worker.state = S.WORKER_STATE_IDLE
            worker.address = address
            worker.last_activity = time.time()
        log.info("worker reported", worker_id=worker_id, address=address, load_error=load_error)
        worker.settled.set()
        self.on_change()
        return worker

    async def stop(
        self, worker_id: str, force: bool = False, grace: float | None = None
    ) -> ManagedWorker:
        """Stop the worker's process group and drop its row; returns when the process is gone."""
        worker = self.get(worker_id)
        grace = self.stop_grace if grace is None or grace <= 0 else grace
        if not worker.exited.is_set():
            worker.state = S.WORKER_STATE_STOPPING
            self.on_change()
            await self._terminate(worker, force, grace)
        self.workers.pop(worker_id, None)
        self.on_change()
        return worker

    async def _terminate(self, worker: ManagedWorker, force: bool, grace: float) -> None:
        ident = worker.identity
        if ident is None:
            await worker.exited.wait()
            return
        if not force:
            self.launcher.signal_group(ident, signal.SIGTERM)
            try:
                await asyncio.wait_for(worker.exited.wait(), grace)
                return
            except TimeoutError:
                log.warning("worker ignored SIGTERM; killing", worker_id=worker.id, grace=grace)
        self.launcher.signal_group(ident, signal.SIGKILL)
        await worker.exited.wait()

    async def stop_all(self, grace: float | None = None) -> None:
        await asyncio.gather(
            *(self.stop(wid, grace=grace) for wid in list(self.workers)), return_exceptions=True
        )
