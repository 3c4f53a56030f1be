"""Test doubles for our pure logic and the code that waits: a clock the test moves by hand."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class FakeClock:
    """Monotonic and wall time that move only when the test says so.

    `await clock.sleep(s)` waits until the test moves the clock past now + s: `advance()`
    moves it at once (sleepers wake at the test's next await), `run(s)` steps through every
    wake-up on the way and lets each woken task run before going on.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.wall = 1_700_000_000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall + self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), woken))
        await woken

    @property
    def sleeping(self) -> int:
        """Tasks waiting on this clock."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._wake_due()

    async def run(self, seconds: float, step_yields: int = 20) -> None:
        """Move forward `seconds`, stopping at each sleeper's wake-up to let it run."""
        target = self.now + seconds
        await settle(step_yields)
        while self._sleepers and self._sleepers[0][0] <= target:
            self.now = max(self.now, self._sleepers[0][0])
            self._wake_due()
            await settle(step_yields)
        self.now = target
        await settle(step_yields)

    def _wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _, _, woken = heapq.heappop(self._sleepers)
            if not woken.done():
                woken.set_result(None)


async def settle(yields: int = 20) -> None:
    """Let ready tasks run (each await of a done future or sleep(0) is one loop turn)."""
    for _ in range(yields):
        await asyncio.sleep(0)
