"""The dashboard's 15-minute time series: requests/s, TTFT p50/p90 and queue depth, one point
per interval (5 s), in memory and bounded. Pure: the queen's metrics feed it each request's
end, a sampler gives it the queue depth and closes each interval with the clock's readings."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

INTERVAL = 5.0
SPAN = 15 * 60.0
# TTFTs kept per interval for its percentiles: the newest ones, so a flood costs no memory.
MAX_TTFTS = 4096


@dataclass(frozen=True)
class Point:
    """One interval's figures. `time` is wall seconds at its end; rates are per second over
    the interval; TTFTs (seconds) are None when no request got a first token in it."""

    time: float
    requests_per_second: float
    failed_per_second: float
    ttft_p50: float | None
    ttft_p90: float | None
    queue_depth: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(math.ceil(fraction * len(ordered)), 1)
    return ordered[rank - 1]


class Series:
    """Requests ending and queue depths go in as they happen; `close()` turns the interval
    into a Point. At most SPAN / INTERVAL points are kept, the oldest dropped."""

    def __init__(
        self, interval: float = INTERVAL, span: float = SPAN, max_ttfts: int = MAX_TTFTS
    ) -> None:
        if interval <= 0 or span < interval:
            raise ValueError("the interval must be positive and no longer than the span")
        self.interval = interval
        self.points: deque[Point] = deque(maxlen=int(span // interval))
        self._ended = 0
        self._failed = 0
        self._ttfts: deque[float] = deque(maxlen=max_ttfts)
        self._queue_peak = 0

    def ended(self, ok: bool, ttft: float | None) -> None:
        """A request the queen took has ended (a client's cancel counts as not failed)."""
        self._ended += 1
        if not ok:
            self._failed += 1
        if ttft is not None and math.isfinite(ttft) and ttft >= 0:
            self._ttfts.append(ttft)

    def queue_seen(self, depth: int) -> None:
        """The queue's depth now; an interval reports the highest it saw."""
        self._queue_peak = max(self._queue_peak, depth)

    def close(self, wall: float, elapsed: float) -> Point:
        """End the interval that lasted `elapsed` seconds and ended at `wall`."""
        seconds = elapsed if elapsed > 0 else self.interval
        ttfts = list(self._ttfts)
        point = Point(
            time=wall,
            requests_per_second=self._ended / seconds,
            failed_per_second=self._failed / seconds,
            ttft_p50=percentile(ttfts, 0.5),
            ttft_p90=percentile(ttfts, 0.9),
            queue_depth=self._queue_peak,
        )
        self.points.append(point)
        self._ended = self._failed = self._queue_peak = 0
        self._ttfts.clear()
        return point
