"""Time sources, injected so pure logic and the code that waits can be driven by a fake clock."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never jumps; used for ages and timeouts."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch; used only for display."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on this clock (a fake clock waits until the test moves it)."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))
