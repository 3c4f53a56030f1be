"""A worker whose hive is gone stops by itself, instead of running on as an orphan forever.

Its hive asks after it (GetStatus) every health interval while it is ready. A hive killed
and not restarted stops asking; a hive restarted within the orphan timeout re-adopts the
worker and asks again. Past the timeout the worker drains its streams and exits, as if the
hive had asked it to stop.
"""

from __future__ import annotations

import structlog

from apiary.clock import Clock
from worker.server import WorkerService

log = structlog.get_logger("worker.orphans")

# How often the worker looks, at most (it looks four times per timeout when that is shorter).
LOOK_EVERY = 5.0


async def stop_when_orphaned(service: WorkerService, timeout: float, clock: Clock) -> None:
    """Set the worker's stop event once its hive has been silent for `timeout` (0: never)."""
    if timeout <= 0:
        return
    while not service.stop.is_set():
        await clock.sleep(min(timeout / 4, LOOK_EVERY))
        silent = clock.monotonic() - service.heard_from_hive
        if silent >= timeout:
            log.warning(
                "no word from the hive: stopping (orphaned)",
                silent_seconds=round(silent, 1),
                orphan_timeout=timeout,
            )
            service.stop.set()
            return
