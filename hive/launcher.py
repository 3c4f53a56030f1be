"""The OS edge of the supervisor: start processes, read their identity, signal them safely."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil
import structlog

log = structlog.get_logger("hive.launcher")


@dataclass(frozen=True)
class ProcessIdentity:
    """A pid alone can be recycled; (pid, create_time) names one process for its whole life."""

    pid: int
    create_time: float


class Launcher:
    async def start(
        self, argv: Sequence[str], env: Mapping[str, str]
    ) -> tuple[asyncio.subprocess.Process, ProcessIdentity | None]:
        """Start `argv` in its own session (so it and its children form one group)."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        return proc, self.identity(proc.pid)

    def identity(self, pid: int) -> ProcessIdentity | None:
        try:
            return ProcessIdentity(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def matches(self, ident: ProcessIdentity) -> bool:
        """True if `ident` still names a live (or unreaped) process."""
        current = self.identity(ident.pid)
        return current is not None and current.create_time == ident.create_time

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
