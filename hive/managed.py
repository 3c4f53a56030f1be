"""A worker as the supervisor holds it: spec, lifecycle, the process running for it, counters.

Its own module, below the supervisor, so the table's row mapping (hive/store.py) and the
records (hive/records.py) can name it without importing the supervisor.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apiary.clock import Clock
from hive.launcher import Launched, ProcessIdentity
from hive.spec import WorkerSpec
from hive.states import PROTO_STATES, Lifecycle
from protos.v1 import common_pb2


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
    # What its backend serves, and one request's context length (said when ready).
    task: common_pb2.WorkerTask.ValueType = common_pb2.WORKER_TASK_UNSPECIFIED
    context_length: int = 0
    features: tuple[str, ...] = ()
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

    async def until_due(self, clock: Clock) -> bool:
        """Wait for the lifecycle's next deadline, or for it to move (`rearm`). True: a tick is
        due now; False: the deadline may have moved, so read it again."""
        self.rearm.clear()
        wake = self.life.wake_at()
        delay = None if wake is None else wake - clock.monotonic()
        if delay is not None and delay <= 0:
            return True
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.rearm.wait())]
        if delay is not None:
            waits.append(asyncio.ensure_future(clock.sleep(delay)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return False
