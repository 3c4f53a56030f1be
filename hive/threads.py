"""CPU threads for engine workers, handed out by their hive. Pure: no I/O.

Engines that compute on CPU threads (llama.cpp's) spin them while they decode; two engines
that each take every core fight over them and can livelock (seen here: two workers, each with
as many threads as cores, did not finish a 64-token answer in 10 minutes). So the engines of
one hive together never ask for more threads than the machine has cores:
- a worker spawned without `threads` gets the cores shared evenly among the engine workers
  (those running and those being spawned together), within what is still free;
- an explicit `threads` that would go over the cores is refused, with the arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping


class ThreadsRefused(ValueError):
    """The threads asked for, or any at all, do not fit; the message shows the arithmetic."""


def thread_share(
    cores: int,
    held: Mapping[str, int],
    wanted: int | None = None,
    count: int = 1,
    among: int = 0,
) -> int:
    """Threads for each of `count` new engine workers, given the threads `held` by the engine
    workers already running (worker id -> threads); the default shares the cores among those
    and `among` new ones (at least `count`: others may be spawned right after)."""
    taken = sum(held.values())
    free = cores - taken
    holders = ", ".join(f"{worker} {threads}" for worker, threads in sorted(held.items()))
    by_whom = f" ({holders})" if holders else ""
    if wanted is not None:
        asked = wanted * count
        if taken + asked > cores:
            many = f"{count} x {wanted}" if count > 1 else str(wanted)
            raise ThreadsRefused(
                f"threads={wanted} does not fit: engine workers would ask for {taken} held"
                f"{by_whom} + {many} = {taken + asked} threads on {cores} core(s); "
                f"{max(free, 0)} free"
            )
        return wanted
    share = min(max(1, cores // (len(held) + max(among, count))), free // max(count, 1))
    if share < 1:
        raise ThreadsRefused(
            f"no CPU thread is free for {count} more engine worker(s): {taken} of {cores} "
            f"core(s) are held by engine workers{by_whom}; stop one, or start workers with "
            "fewer threads"
        )
    return share
