"""Stand-ins for the OS and the workers, so the Supervisor runs with no process at all."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hive.launcher import FoundWorker, Launched, Launcher, ProcessIdentity
from hive.store import TableUnreadable, WorkerRow, WorkerStore
from hive.worker_client import WorkerClient
from protos.v1 import common_pb2


class FakeProcess:
    """What asyncio.subprocess.Process offers the supervisor: a pid and wait()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await self._exited

    def exit(self, code: int) -> None:
        if not self._exited.done():
            self.returncode = code
            self._exited.set_result(code)


class FakeLauncher(Launcher):
    """Processes that exist only here; each obeys SIGKILL, and SIGTERM unless told not to."""

    def __init__(self) -> None:
        super().__init__()
        self._pids = itertools.count(1000)
        self.processes: dict[int, FakeProcess] = {}
        self.argvs: list[list[str]] = []
        self.signals: list[tuple[int, signal.Signals]] = []
        self.ignores_sigterm = False
        # Processes from before a "hive restart": pid -> worker id of their marker.
        self.orphans: dict[ProcessIdentity, str] = {}
        self.gone: dict[ProcessIdentity, asyncio.Event] = {}
        self.fail_next_start = ""
        # Live workers of this hive id found by their markers (not through the table).
        self.found: list[FoundWorker] = []

    def worker_env(self, worker_id: str, token: str, spec: str = "") -> dict[str, str]:
        return {"APIARY_WORKER_ID": worker_id}

    async def start(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> Launched:
        if self.fail_next_start:
            error, self.fail_next_start = self.fail_next_start, ""
            raise OSError(error)
        await asyncio.sleep(0)  # starting a process yields to the loop, as the real one does
        self.argvs.append(list(argv))
        proc = FakeProcess(next(self._pids))
        self.processes[proc.pid] = proc
        return Launched(ProcessIdentity(proc.pid, 1.0), proc)  # type: ignore[arg-type]

    def matches(self, ident: ProcessIdentity) -> bool:
        if ident in self.orphans:
            return not self.gone[ident].is_set()
        proc = self.processes.get(ident.pid)
        return proc is not None and proc.returncode is None

    def owns(self, ident: ProcessIdentity, worker_id: str) -> bool:
        return self.matches(ident) and self.orphans.get(ident, worker_id) == worker_id

    def add_orphan(self, pid: int, worker_id: str) -> ProcessIdentity:
        ident = ProcessIdentity(pid, 2.0)
        self.orphans[ident] = worker_id
        self.gone[ident] = asyncio.Event()
        return ident

    def signal_group(self, ident: ProcessIdentity, sig: signal.Signals) -> bool:
        if not self.matches(ident):
            return False
        self.signals.append((ident.pid, sig))
        if sig == signal.SIGKILL or not self.ignores_sigterm:
            self.kill(ident, -sig.value)
        return True

    def kill(self, ident: ProcessIdentity, code: int = -9) -> None:
        if ident in self.gone:
            self.gone[ident].set()
        elif ident.pid in self.processes:
            self.processes[ident.pid].exit(code)

    async def wait_gone(self, ident: ProcessIdentity) -> None:
        if ident in self.gone:
            await self.gone[ident].wait()
        elif ident.pid in self.processes:
            await self.processes[ident.pid].wait()

    def own_workers(self) -> list[FoundWorker]:
        return list(self.found)

    def sample(self, ident: ProcessIdentity) -> tuple[float, int]:
        return 1.0, 1 << 20

    def forget(self, ident: ProcessIdentity) -> None:
        pass


class FakeWorkerClient(WorkerClient):
    """Workers that answer health checks and status as the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.healthy: dict[str, bool] = {}
        self.busy: dict[str, bool] = {}
        self.last_activity: dict[str, float] = {}
        self.shutdowns: list[tuple[str, float]] = []
        self.accepts_shutdown = True
        self.forgotten: list[str] = []

    async def check(self, worker_id: str, address: str, timeout: float) -> tuple[bool, str]:
        if self.healthy.get(address, True):
            return True, ""
        return False, "DEADLINE_EXCEEDED: Deadline Exceeded"

    async def status(
        self, worker_id: str, address: str, timeout: float
    ) -> common_pb2.WorkerRecord | None:
        record = common_pb2.WorkerRecord(
            state=common_pb2.WORKER_STATE_BUSY
            if self.busy.get(address)
            else common_pb2.WORKER_STATE_IDLE
        )
        record.last_activity.seconds = int(self.last_activity.get(address, 0))
        return record

    async def shutdown(
        self, worker_id: str, address: str, grace: float, timeout: float = 1.0
    ) -> bool:
        self.shutdowns.append((address, grace))
        return self.accepts_shutdown

    def forget(self, address: str) -> None:
        self.forgotten.append(address)


class MemoryStore(WorkerStore):
    """The worker table in memory (it is read back as a restarted hive would)."""

    def __init__(self, rows: list[WorkerRow] | None = None, unreadable: bool = False) -> None:
        super().__init__(Path("/nonexistent/apiary-test-state"))
        self.rows = list(rows or [])
        self.saves = 0
        self.unreadable = unreadable
        # Saving fails with this errno (0: it works), or after this many more saves.
        self.fail_with = 0
        self.fail_after: int | None = None

    def load(self) -> list[WorkerRow]:
        if self.unreadable:
            raise TableUnreadable(self.path, None, "Expecting value: line 1 column 1 (char 0)")
        return list(self.rows)

    def save(self, rows: list[WorkerRow]) -> None:
        if self.fail_after is not None:
            self.fail_after -= 1
            if self.fail_after < 0:
                self.fail_with = errno.ENOSPC
        if self.fail_with:
            raise OSError(self.fail_with, os.strerror(self.fail_with))
        self.rows = list(rows)
        self.saves += 1


def noop(*_: Any) -> None:
    pass
