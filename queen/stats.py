"""What the queen measures of each worker's requests: pure bookkeeping, no I/O."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

WINDOW = 100
# Weight of the newest sample in the tokens/s moving average.
SPEED_ALPHA = 0.2


@dataclass
class WorkerStatsTracker:
    completed: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    total_duration: float = 0.0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    # Completion tokens per second; None until a request completed.
    speed: float | None = None

    def record(self, ok: bool, duration: float, tokens: int) -> None:
        if ok:
            self.completed += 1
            self.consecutive_failures = 0
            self.total_duration += duration
            self.durations.append(duration)
            if duration > 0 and tokens > 0:
                sample = tokens / duration
                self.speed = (
                    sample
                    if self.speed is None
                    else (1 - SPEED_ALPHA) * self.speed + SPEED_ALPHA * sample
                )
        else:
            self.failed += 1
            self.consecutive_failures += 1

    @property
    def success_rate(self) -> float:
        total = self.completed + self.failed
        return self.completed / total if total else 1.0

    @property
    def mean_duration(self) -> float:
        return self.total_duration / self.completed if self.completed else 0.0

    @property
    def p50_duration(self) -> float:
        return statistics.median(self.durations) if self.durations else 0.0
