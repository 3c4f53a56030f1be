"""The OS edge of the supervisor: start, identify, watch and signal processes safely."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import structlog

log = structlog.get_logger("hive.launcher")

# Used only where pidfd_open is unavailable (old kernels).
_POLL_SECONDS = 0.05


# The environment marker by which a hive finds Apiary workers among all processes.
WORKER_ID_ENV = "APIARY_WORKER_ID"
WORKER_TOKEN_ENV = "APIARY_WORKER_TOKEN"


@dataclass(frozen=True)
class ProcessIdentity:
    """A pid alone can be recycled; (pid, create_time) names one process for its whole life."""

    pid: int
    create_time: float


@dataclass
class Launched:
    """A worker process: our child (`process` set) or adopted after a hive restart (None)."""

    identity: ProcessIdentity | None
    process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        if self.identity is not None:
            return self.identity.pid
        return self.process.pid if self.process is not None else 0


class Launcher:
    def __init__(self) -> None:
        # psutil handles kept between samples: cpu_percent() measures since the last call.
        self._sampled: dict[ProcessIdentity, psutil.Process] = {}

    def worker_env(self, worker_id: str, token: str) -> dict[str, str]:
        """The hive's environment plus the worker's marker (and token: never on a command line)."""
        env = dict(os.environ)
        env[WORKER_ID_ENV] = worker_id
        if token:
            env[WORKER_TOKEN_ENV] = token
        return env

    async def start(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> Launched:
        """Start `argv` in its own session (so it and its children form one group).

        Output goes to `log_path`, not to the hive's stderr: a worker outlives a hive
        restart, and must not die writing to a pipe nobody reads any more.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:  # noqa: ASYNC230 - an open(2), not a read
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        return Launched(self.identity(proc.pid), proc)

    async def wait_exit(self, launched: Launched) -> int | None:
        """The exit code, the moment the process ends (None: not our child, code unknown)."""
        if launched.process is not None:
            return await launched.process.wait()
        if launched.identity is not None:
            await self.wait_gone(launched.identity)
        return None

    def owns(self, ident: ProcessIdentity, worker_id: str) -> bool:
        """True if `ident` is alive and is the worker process `worker_id` (by its marker)."""
        if not self.matches(ident):
            return False
        try:
            return psutil.Process(ident.pid).environ().get(WORKER_ID_ENV) == worker_id
        except psutil.Error:
            return False

    def sample(self, ident: ProcessIdentity) -> tuple[float, int]:
        """(cpu % since the last sample, rss bytes); zeros when the process is gone."""
        proc = self._sampled.get(ident)
        try:
            if proc is None:
                proc = self._sampled[ident] = psutil.Process(ident.pid)
                proc.cpu_percent(None)  # prime: the first reading is always 0
            with proc.oneshot():
                return proc.cpu_percent(None), proc.memory_info().rss
        except psutil.Error:
            self._sampled.pop(ident, None)
            return 0.0, 0

    def forget(self, ident: ProcessIdentity) -> None:
        self._sampled.pop(ident, None)

    def identity(self, pid: int) -> ProcessIdentity | None:
        try:
            return ProcessIdentity(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def matches(self, ident: ProcessIdentity) -> bool:
        """True if `ident` still names a live (not zombie) process."""
        try:
            proc = psutil.Process(ident.pid)
            return proc.create_time() == ident.create_time and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def signal_group(self, ident: ProcessIdentity, sig: signal.Signals) -> bool:
        """Signal the process group led by `ident`, only if the pid still names that process."""
        if not self.matches(ident):
            log.info("not signalling: process is gone or pid was reused", pid=ident.pid)
            return False
        try:
            os.killpg(ident.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError as exc:
            log.warning("cannot signal process group", pid=ident.pid, error=str(exc))
            return False
        return True

    async def wait_gone(self, ident: ProcessIdentity) -> None:
        """Wait for a process that is not our child (adopted after a hive restart) to end.

        A pidfd becomes readable the moment the process exits, so an adopted worker's death
        is seen as fast as a child's.
        """
        try:
            fd = os.pidfd_open(ident.pid)
        except ProcessLookupError:
            return
        except (OSError, AttributeError):
            while self.matches(ident):  # noqa: ASYNC110 - nothing to wait on but the pid
                await asyncio.sleep(_POLL_SECONDS)
            return
        try:
            # The pid may have been reused between our identity check and pidfd_open.
            if not self.matches(ident):
                return
            loop = asyncio.get_running_loop()
            gone: asyncio.Future[None] = loop.create_future()

            def on_exit() -> None:
                if not gone.done():
                    gone.set_result(None)

            loop.add_reader(fd, on_exit)
            try:
                await gone
            finally:
                loop.remove_reader(fd)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
