"""Time sources, injected so pure logic can be driven by a fake clock in tests."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never jumps; used for ages and timeouts."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch; used only for display."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()
