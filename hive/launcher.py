"""The OS edge of the supervisor: start, identify, watch and signal processes safely."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import structlog

log = structlog.get_logger("hive.launcher")

# Used only where pidfd_open is unavailable (old kernels).
_POLL_SECONDS = 0.05


# The environment markers by which a hive finds Apiary workers among all processes, and tells
# its own from another live hive's and from orphans.
WORKER_ID_ENV = "APIARY_WORKER_ID"
HIVE_ID_ENV = "APIARY_HIVE_ID"
HIVE_PROCESS_ENV = "APIARY_HIVE_PROCESS"
# The hive's state dir: with the hive id, what makes a later hive process the same hive.
HIVE_STATE_ENV = "APIARY_HIVE_STATE"
WORKER_TOKEN_ENV = "APIARY_WORKER_TOKEN"
# What the worker was spawned as (JSON), so a hive whose table is lost can rebuild its row.
WORKER_SPEC_ENV = "APIARY_WORKER_SPEC"


def is_secret(name: str) -> bool:
    """Credentials of the hive's own environment, which its workers must not inherit."""
    return name.startswith("APIARY_") and ("TOKEN" in name or name.endswith("_KEY"))


@dataclass(frozen=True)
class HiveInstance:
    """This hive process: its id, and (pid, create time, a nonce) naming this run of it."""

    hive_id: str
    pid: int
    create_time: float
    nonce: str

    @classmethod
    def current(cls, hive_id: str) -> HiveInstance:
        return cls(hive_id, os.getpid(), psutil.Process().create_time(), uuid.uuid4().hex[:16])

    @property
    def marker(self) -> str:
        return f"{self.pid}:{self.create_time!r}:{self.nonce}"


@dataclass(frozen=True)
class ProcessIdentity:
    """A pid alone can be recycled; (pid, create_time) names one process for its whole life."""

    pid: int
    create_time: float


def dial_address(ip: str, port: int) -> str:
    """Where to reach a socket bound to `ip`: a wildcard or mapped address as its loopback."""
    ip = ip.removeprefix("::ffff:")
    if ip in ("0.0.0.0", "::", ""):
        ip = "127.0.0.1"
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True)
class FoundWorker:
    """A live worker process found by its markers (not through the table)."""

    identity: ProcessIdentity
    worker_id: str
    spec: str  # the JSON it was spawned with
    address: str  # where it listens ('' if not yet)


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
    def __init__(self, hive_id: str = "", state_dir: str = "") -> None:
        self.instance = HiveInstance.current(hive_id)
        self.state_dir = state_dir
        # psutil handles kept between samples: cpu_percent() measures since the last call.
        self._sampled: dict[ProcessIdentity, psutil.Process] = {}

    def worker_env(self, worker_id: str, token: str, spec: str = "") -> dict[str, str]:
        """The hive's environment without its secrets, the worker's markers, and the worker's
        own credential (in the environment, never on a command line)."""
        env = {k: v for k, v in os.environ.items() if not is_secret(k)}
        env[WORKER_ID_ENV] = worker_id
        env[HIVE_ID_ENV] = self.instance.hive_id
        env[HIVE_PROCESS_ENV] = self.instance.marker
        env[HIVE_STATE_ENV] = self.state_dir
        if spec:
            env[WORKER_SPEC_ENV] = spec
        if token:
            env[WORKER_TOKEN_ENV] = token
        return env

    def hive_alive(self, marker: str) -> bool:
        """True if the hive process a worker's marker names still runs (this one included)."""
        pid, _, rest = marker.partition(":")
        create_time, _, _nonce = rest.partition(":")
        try:
            return self.matches(ProcessIdentity(int(pid), float(create_time)))
        except ValueError:
            return False

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
            env = psutil.Process(ident.pid).environ()
        except psutil.Error:
            return False
        hive_id = env.get(HIVE_ID_ENV, self.instance.hive_id)
        return env.get(WORKER_ID_ENV) == worker_id and hive_id == self.instance.hive_id

    def own_workers(self) -> list[FoundWorker]:
        """Worker processes an earlier, dead run of this hive id launched (by their markers);
        not those of another hive that happens to use the same id (another state dir, or
        still running)."""
        found = []
        for proc in psutil.process_iter():
            try:
                with proc.oneshot():
                    env = proc.environ()
                    worker_id = env.get(WORKER_ID_ENV, "")
                    if not worker_id or env.get(HIVE_ID_ENV) != self.instance.hive_id:
                        continue
                    if env.get(HIVE_STATE_ENV) != self.state_dir:
                        continue  # another hive with the same id (another state dir)
                    if self.hive_alive(env.get(HIVE_PROCESS_ENV, "")):
                        continue  # its hive runs: ours to adopt only if our table says so
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        continue
                    ident = ProcessIdentity(proc.pid, proc.create_time())
                    listening = [
                        c.laddr
                        for c in proc.net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN
                    ]
            except psutil.Error:
                continue
            address = dial_address(listening[0].ip, listening[0].port) if listening else ""
            found.append(FoundWorker(ident, worker_id, env.get(WORKER_SPEC_ENV, ""), address))
        return found

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
            # Not a group leader (a worker started by hand, outside its own session): the
            # process alone, then.
            try:
                os.kill(ident.pid, sig)
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
