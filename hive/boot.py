"""The workers a hive keeps from boot (--spawn): each entry brought to its count, and kept there.

Apart from the supervisor because it is a policy over the whole table (how many of which
spec), where the supervisor only carries out each worker's own lifecycle. The supervisor
calls back (`on_kept_expired`) when a kept worker that failed for good has its row expire.
"""

from __future__ import annotations

import asyncio

import structlog

from apiary.errors import StatusError
from hive.spec import WorkerSpec
from hive.supervisor import Supervisor

log = structlog.get_logger("hive.boot")


class BootWorkers:
    """The --spawn entries (spec, count) of one hive, and the reconciliation that keeps them."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.entries: list[tuple[WorkerSpec, int]] = []
        self._keeping = asyncio.Lock()
        # A kept worker that failed for good is replaced once its row expires.
        supervisor.on_kept_expired = self.keep

    async def keep(self) -> None:
        """Bring each entry to its count: at boot (re-adopted workers count), and when a kept
        worker that failed for good has its row expire. A worker an operator stops is not
        replaced: that is how a hive is scaled down."""
        async with self._keeping:  # one reconciliation at a time, or both would spawn
            for spec, count in self.entries:
                try:
                    await self.ensure(spec, count, keep=not spec.idle_retire)
                except StatusError as refused:
                    log.error("cannot keep boot workers", model=spec.model, error=refused.message)

    async def ensure(self, spec: WorkerSpec, count: int, keep: bool = True) -> None:
        """Have `count` workers of `spec`: re-adopted ones count, and are kept from idle
        retirement like new ones unless `keep` is off."""
        workers = self.supervisor.workers.values()
        have = [w for w in workers if w.spec.same_as(spec) and not w.life.leaving]
        for worker in have:
            worker.keep = keep
        for _ in range(count - len(have)):
            await self.supervisor.spawn(WorkerSpec(**vars(spec)), keep=keep)
