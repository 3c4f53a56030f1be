"""Picking a worker without scanning the fleet: per-pool indexes, one per routing policy.

A pool is the workers of one model that carry a set of required tags. Each
policy keeps its own index over the pool's eligible workers (free slot, ready,
not drained, circuit closed), updated whenever a worker changes:

- least-loaded, lru, score and shortest-queue group workers by an integer level
  (free slots; nothing; the score or queue-per-speed quantised to fixed steps),
  least recently used first within a level: O(1) per change and per pick.
- lottery samples a dense array and accepts by relative speed: O(1) expected.

Hive health is time-based, so it is judged at pick time: a worker on an
unhealthy hive is dropped from the index (its next heartbeat puts it back), one
on a degraded hive is passed over unless nothing healthy is free.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from protos.v1 import common_pb2


class Verdict(enum.Enum):
    TAKE = 1
    # Keep it in the index, but not for this request (an address already tried).
    SKIP = 2
    # Usable only if nothing better is free (its hive is degraded).
    LATER = 3
    # Take it out of the index until something re-adds it (its hive is unhealthy).
    DROP = 4


Judge = Callable[[str], Verdict]


class Routable(Protocol):
    """What the indexes read of a worker."""

    @property
    def id(self) -> str: ...
    @property
    def free_slots(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def slots_total(self) -> int: ...
    @property
    def last_used(self) -> int: ...
    @property
    def speed(self) -> float | None: ...
    @property
    def success_rate(self) -> float: ...


class SpeedScale:
    """The pool's fastest measured speed: speeds are judged relative to it.

    A max-heap of (speed, worker) entries with lazy deletion: a new speed pushes an entry, and
    entries that no longer match a worker's speed are dropped when they reach the top. So
    when the fastest worker slows down (and under the score policy the fastest is picked most
    often) the next fastest is found in O(log n), not by a scan of the pool. The heap is
    compacted when stale entries outnumber live ones (O(1) per update on average).
    """

    def __init__(self) -> None:
        self._speeds: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # (-speed, worker id), stale ones included

    @property
    def fastest(self) -> float:
        heap, speeds = self._heap, self._speeds
        while heap:
            negative, worker_id = heap[0]
            if speeds.get(worker_id) == -negative:
                return -negative
            heapq.heappop(heap)
        return 0.0

    def note(self, worker_id: str, speed: float | None) -> None:
        if speed is None:
            self.forget(worker_id)
            return
        if self._speeds.get(worker_id) == speed:
            return
        self._speeds[worker_id] = speed
        heapq.heappush(self._heap, (-speed, worker_id))
        if len(self._heap) > 2 * len(self._speeds) + 64:
            self._heap = [(-v, k) for k, v in self._speeds.items()]
            heapq.heapify(self._heap)

    def forget(self, worker_id: str) -> None:
        self._speeds.pop(worker_id, None)

    def of(self, worker: Routable) -> float:
        """Speed in (0, 1]; a worker not yet measured counts as the fastest, so it gets tried."""
        fastest = self.fastest
        if worker.speed is None or fastest <= 0:
            return 1.0
        return min(worker.speed / fastest, 1.0)


def score(worker: Routable, scale: SpeedScale) -> float:
    free_ratio = worker.free_slots / worker.slots_total if worker.slots_total else 0.0
    return 0.5 * free_ratio + 0.3 * worker.success_rate + 0.2 * scale.of(worker)


def _scan(order: OrderedDict[str, int], judge: Judge) -> tuple[str | None, str | None, list[str]]:
    """In order: the first TAKE, the first LATER (fallback), and the DROPs met on the way."""
    dropped: list[str] = []
    fallback: str | None = None
    for worker_id in order:
        verdict = judge(worker_id)
        if verdict is Verdict.TAKE:
            return worker_id, fallback, dropped
        if verdict is Verdict.DROP:
            dropped.append(worker_id)
        elif verdict is Verdict.LATER and fallback is None:
            fallback = worker_id
    return None, fallback, dropped


class LevelIndex:
    """Workers grouped by an integer level, least recently used first within a level.

    A pick walks the non-empty levels from the best one and takes the first acceptable
    worker, so it costs O(1) in the number of workers: levels are few (free-slot counts,
    or a policy's value quantised to a fixed number of steps) and kept sorted.
    """

    def __init__(self, level: Callable[[Routable], int], best_first_descending: bool) -> None:
        self.level = level
        self.descending = best_first_descending
        self._levels: dict[int, OrderedDict[str, int]] = {}  # level -> id -> last_used
        self._sorted: list[int] = []  # non-empty levels, ascending
        self._where: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._where)

    def update(self, worker: Routable, eligible: bool) -> None:
        old = self._where.get(worker.id)
        if not eligible:
            if old is not None:
                self._remove(worker.id, old)
            return
        level = self.level(worker)
        if old is not None and old != level:
            self._remove(worker.id, old)
            old = None
        bucket = self._levels.get(level)
        if bucket is None:
            bucket = self._levels[level] = OrderedDict()
            bisect.insort(self._sorted, level)
        seen = bucket.get(worker.id)
        if seen == worker.last_used:
            return  # not used since: keep its place
        bucket[worker.id] = worker.last_used
        self._where[worker.id] = level
        if old is None and len(bucket) > 1 and worker.last_used < next(iter(bucket.values())):
            bucket.move_to_end(worker.id, last=False)  # back in, and the longest unused
        else:
            bucket.move_to_end(worker.id)

    def _remove(self, worker_id: str, level: int) -> None:
        bucket = self._levels[level]
        del bucket[worker_id]
        del self._where[worker_id]
        if not bucket:
            del self._levels[level]
            del self._sorted[bisect.bisect_left(self._sorted, level)]

    def discard(self, worker_id: str) -> None:
        level = self._where.get(worker_id)
        if level is not None:
            self._remove(worker_id, level)

    def rebuild(self, workers: Iterable[Routable]) -> None:
        """Re-level every worker (after the speed scale moved), keeping use order."""
        live = sorted(workers, key=lambda w: w.last_used)
        self._levels.clear()
        self._sorted.clear()
        self._where.clear()
        for worker in live:
            self.update(worker, True)

    def pick(self, judge: Judge) -> str | None:
        fallback: str | None = None
        levels = reversed(self._sorted) if self.descending else iter(self._sorted)
        for level in list(levels):
            chosen, later, dropped = _scan(self._levels[level], judge)
            for worker_id in dropped:
                self._remove(worker_id, level)
            if chosen is not None:
                return chosen
            fallback = fallback or later
        return fallback


class SampleIndex:
    """Speed-weighted random choice (FastChat's lottery) by rejection sampling.

    Draw a worker uniformly from a dense array, keep it with probability equal to its
    speed relative to the fastest: O(1) expected per pick while speeds are comparable,
    and never a scan (after MAX_DRAWS rejections the best drawn so far is taken).
    """

    MAX_DRAWS = 32

    def __init__(self, scale: SpeedScale, rng: random.Random) -> None:
        self.scale = scale
        self.rng = rng
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._members: dict[str, Routable] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def update(self, worker: Routable, eligible: bool) -> None:
        if not eligible:
            self.discard(worker.id)
            return
        self._members[worker.id] = worker
        if worker.id not in self._pos:
            self._pos[worker.id] = len(self._ids)
            self._ids.append(worker.id)

    def discard(self, worker_id: str) -> None:
        i = self._pos.pop(worker_id, None)
        if i is None:
            return
        last = self._ids.pop()
        if last != worker_id:
            self._ids[i] = last
            self._pos[last] = i
        del self._members[worker_id]

    def rebuild(self, workers: Iterable[Routable]) -> None:
        pass  # weights are read at draw time

    def pick(self, judge: Judge) -> str | None:
        fallback: str | None = None
        best: tuple[float, str] | None = None
        skipped: set[str] = set()
        for _ in range(self.MAX_DRAWS):
            if len(skipped) >= len(self._ids):
                break
            worker_id = self._ids[self.rng.randrange(len(self._ids))]
            if worker_id in skipped:
                continue
            verdict = judge(worker_id)
            if verdict is Verdict.DROP:
                self.discard(worker_id)
                if not self._ids:
                    break
                continue
            if verdict is not Verdict.TAKE:
                skipped.add(worker_id)
                if verdict is Verdict.LATER and fallback is None:
                    fallback = worker_id
                continue
            weight = self.scale.of(self._members[worker_id])
            if self.rng.random() < weight:
                return worker_id
            if best is None or weight > best[0]:
                best = (weight, worker_id)
        return best[1] if best is not None else fallback


Index = LevelIndex | SampleIndex
# Policies whose levels depend on the speed scale.
SPEED_POLICIES = frozenset(
    {common_pb2.ROUTING_POLICY_SCORE, common_pb2.ROUTING_POLICY_SHORTEST_QUEUE}
)
# Steps the score (0..1) and the queue length per unit of speed are quantised to.
SCORE_STEPS = 1000
QUEUE_STEPS = 64
MAX_QUEUE_LEVEL = 1 << 16


def make_index(policy: int, scale: SpeedScale, rng: random.Random) -> Index:
    if policy == common_pb2.ROUTING_POLICY_LOTTERY:
        return SampleIndex(scale, rng)
    if policy == common_pb2.ROUTING_POLICY_LRU:
        return LevelIndex(lambda w: 0, best_first_descending=False)
    if policy == common_pb2.ROUTING_POLICY_SCORE:
        return LevelIndex(
            lambda w: round(score(w, scale) * SCORE_STEPS), best_first_descending=True
        )
    if policy == common_pb2.ROUTING_POLICY_SHORTEST_QUEUE:
        return LevelIndex(
            lambda w: min(round(w.in_flight / scale.of(w) * QUEUE_STEPS), MAX_QUEUE_LEVEL),
            best_first_descending=False,
        )
    return LevelIndex(lambda w: w.free_slots, best_first_descending=True)  # least-loaded


@dataclass
class Pool:
    """Workers of one model carrying `tags`; one index per policy, built on first use."""

    model: str
    tags: frozenset[str]
    rng: random.Random
    members: dict[str, Routable] = field(default_factory=dict)
    eligible: set[str] = field(default_factory=set)
    scale: SpeedScale = field(default_factory=SpeedScale)
    indexes: dict[int, Index] = field(default_factory=dict)
    # The fastest speed the speed-based keys were computed with; when the real one moves by
    # more than a quarter, those indexes are re-keyed before the next pick.
    _keyed_fastest: float = 0.0

    def admits(self, tags: Iterable[str]) -> bool:
        return self.tags.issubset(tags)

    def update(self, worker: Routable, eligible: bool) -> None:
        self.members[worker.id] = worker
        if eligible:
            self.eligible.add(worker.id)
        else:
            self.eligible.discard(worker.id)
        self.scale.note(worker.id, worker.speed)
        for index in self.indexes.values():
            index.update(worker, eligible)

    def remove(self, worker_id: str) -> None:
        self.members.pop(worker_id, None)
        self.eligible.discard(worker_id)
        self.scale.forget(worker_id)
        for index in self.indexes.values():
            index.discard(worker_id)

    def index(self, policy: int) -> Index:
        if policy in SPEED_POLICIES:
            fastest = self.scale.fastest
            if abs(fastest - self._keyed_fastest) > 0.25 * max(self._keyed_fastest, 1e-9):
                self._keyed_fastest = fastest
                for p, idx in self.indexes.items():
                    if p in SPEED_POLICIES:
                        idx.rebuild(self.members[w] for w in self.eligible)
        index = self.indexes.get(policy)
        if index is None:
            index = make_index(policy, self.scale, self.rng)
            # In order of last use, so the O(1) indexes start out least recently used first.
            for worker_id in sorted(self.eligible, key=lambda w: self.members[w].last_used):
                index.update(self.members[worker_id], True)
            self.indexes[policy] = index
        return index

    def pick(self, policy: int, judge: Judge) -> str | None:
        if not self.eligible:
            return None
        return self.index(policy).pick(judge)
