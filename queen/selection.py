"""Picking a worker without scanning the fleet: per-pool indexes, one per routing policy.

A pool is the workers of one model that carry a set of required tags. Each
policy keeps its own index over the pool's eligible workers (free slot, ready,
not drained, circuit closed), updated whenever a worker changes:

- heap policies (least-loaded, lru, shortest-queue, score) keep a binary heap
  with lazy deletion: every change pushes a fresh entry and invalidates the old
  one, a pick pops stale entries as it meets them. O(log n) per change and pick.
- lottery keeps a Fenwick tree of speed weights: O(log n) to sample and update.

Hive health is time-based, so it is judged at pick time: a worker on an
unhealthy hive is dropped from the index (its next heartbeat puts it back), one
on a degraded hive is passed over unless nothing healthy is free.
"""

from __future__ import annotations

import enum
import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from protos.v1 import common_pb2

P = common_pb2


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

    A max-heap with lazy deletion, so following the fastest as speeds move costs O(log n).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._live: dict[str, int] = {}
        self._speeds: dict[str, float] = {}
        self._seq = 0

    @property
    def fastest(self) -> float:
        while self._heap and self._live.get(self._heap[0][2]) != self._heap[0][1]:
            heapq.heappop(self._heap)
        return -self._heap[0][0] if self._heap else 0.0

    def note(self, worker_id: str, speed: float | None) -> None:
        if speed is None:
            self._live.pop(worker_id, None)
            return
        if self._speeds.get(worker_id) == speed and worker_id in self._live:
            return
        self._speeds[worker_id] = speed
        self._seq += 1
        self._live[worker_id] = self._seq
        heapq.heappush(self._heap, (-speed, self._seq, worker_id))
        if len(self._heap) > 4 * len(self._live) + 64:
            self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def forget(self, worker_id: str) -> None:
        self._live.pop(worker_id, None)
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


def heap_key(policy: int, worker: Routable, scale: SpeedScale) -> tuple[float, ...]:
    """Smaller is better."""
    if policy == P.ROUTING_POLICY_LRU:
        return (worker.last_used,)
    if policy == P.ROUTING_POLICY_SHORTEST_QUEUE:
        return (worker.in_flight / scale.of(worker), worker.last_used)
    if policy == P.ROUTING_POLICY_SCORE:
        return (-score(worker, scale), worker.last_used)
    return (-worker.free_slots, worker.last_used)  # least-loaded


class HeapIndex:
    def __init__(self, policy: int, scale: SpeedScale) -> None:
        self.policy = policy
        self.scale = scale
        self._heap: list[tuple[tuple[float, ...], int, str]] = []
        self._live: dict[str, int] = {}  # worker id -> sequence of its valid entry
        self._seq = 0

    def __len__(self) -> int:
        return len(self._live)

    def update(self, worker: Routable, eligible: bool) -> None:
        if not eligible:
            self._live.pop(worker.id, None)
            return
        self._seq += 1
        self._live[worker.id] = self._seq
        heapq.heappush(
            self._heap, (heap_key(self.policy, worker, self.scale), self._seq, worker.id)
        )
        if len(self._heap) > 4 * len(self._live) + 64:
            self._compact()

    def discard(self, worker_id: str) -> None:
        self._live.pop(worker_id, None)

    def rebuild(self, workers: Iterable[Routable]) -> None:
        """Recompute every key (after the speed scale moved)."""
        live = set(self._live)
        self._heap.clear()
        self._live.clear()
        for worker in workers:
            if worker.id in live:
                self.update(worker, True)

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
        heapq.heapify(self._heap)

    def pick(self, judge: Judge) -> str | None:
        kept: list[tuple[tuple[float, ...], int, str]] = []
        fallback: str | None = None
        chosen: str | None = None
        while self._heap:
            item = heapq.heappop(self._heap)
            if self._live.get(item[2]) != item[1]:
                continue  # stale
            verdict = judge(item[2])
            if verdict is Verdict.TAKE:
                chosen = item[2]
                kept.append(item)
                break
            if verdict is Verdict.DROP:
                del self._live[item[2]]
                continue
            kept.append(item)
            if verdict is Verdict.LATER and fallback is None:
                fallback = item[2]
        for item in kept:
            heapq.heappush(self._heap, item)
        return chosen or fallback


class LotteryIndex:
    """Speed-weighted random choice over a Fenwick tree of weights."""

    MAX_DRAWS = 16

    def __init__(self, scale: SpeedScale, rng: random.Random) -> None:
        self.scale = scale
        self.rng = rng
        self._pos: dict[str, int] = {}
        self._ids: list[str] = []
        self._weights: list[float] = []
        self._tree: list[float] = [0.0]  # 1-based Fenwick tree
        self._total = 0.0

    def __len__(self) -> int:
        return sum(1 for w in self._weights if w > 0)

    def _add(self, i: int, delta: float) -> None:
        self._total += delta
        i += 1
        while i < len(self._tree):
            self._tree[i] += delta
            i += i & -i

    def _set(self, i: int, weight: float) -> None:
        self._add(i, weight - self._weights[i])
        self._weights[i] = weight

    def _grow(self, worker_id: str) -> int:
        i = len(self._ids)
        self._ids.append(worker_id)
        self._weights.append(0.0)
        self._pos[worker_id] = i
        # Rebuild the tree for the new size: amortised by doubling.
        if len(self._tree) <= len(self._ids):
            size = max(2 * len(self._tree), 16)
            self._tree = [0.0] * size
            for j, w in enumerate(self._weights):
                k = j + 1
                while k < size:
                    self._tree[k] += w
                    k += k & -k
        return i

    def update(self, worker: Routable, eligible: bool) -> None:
        i = self._pos.get(worker.id)
        if i is None:
            if not eligible:
                return
            i = self._grow(worker.id)
        # Weighted by speed, as FastChat's lottery; an unmeasured worker weighs as the fastest.
        self._set(i, self.scale.of(worker) if eligible else 0.0)

    def discard(self, worker_id: str) -> None:
        i = self._pos.get(worker_id)
        if i is not None:
            self._set(i, 0.0)

    def rebuild(self, workers: Iterable[Routable]) -> None:
        for worker in workers:
            i = self._pos.get(worker.id)
            if i is not None and self._weights[i] > 0:
                self._set(i, self.scale.of(worker))

    def _find(self, target: float) -> int:
        """Smallest index whose prefix sum exceeds target."""
        pos, step = 0, 1
        while step * 2 < len(self._tree):
            step *= 2
        while step:
            nxt = pos + step
            if nxt < len(self._tree) and self._tree[nxt] <= target:
                pos = nxt
                target -= self._tree[nxt]
            step //= 2
        return min(pos, len(self._ids) - 1)

    def pick(self, judge: Judge) -> str | None:
        parked: list[tuple[int, float]] = []
        fallback: str | None = None
        chosen: str | None = None
        for _ in range(self.MAX_DRAWS):
            if self._total <= 1e-12:
                break
            i = self._find(self.rng.random() * self._total)
            if self._weights[i] <= 0:
                continue
            worker_id = self._ids[i]
            verdict = judge(worker_id)
            if verdict is Verdict.TAKE:
                chosen = worker_id
                break
            if verdict is Verdict.DROP:
                self._set(i, 0.0)
                continue
            if verdict is Verdict.LATER and fallback is None:
                fallback = worker_id
            parked.append((i, self._weights[i]))
            self._set(i, 0.0)
        for i, weight in parked:
            self._set(i, weight)
        return chosen or fallback


Index = HeapIndex | LotteryIndex
# Policies whose keys depend on the speed scale.
SPEED_POLICIES = frozenset(
    {P.ROUTING_POLICY_SCORE, P.ROUTING_POLICY_SHORTEST_QUEUE, P.ROUTING_POLICY_LOTTERY}
)


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
        fastest = self.scale.fastest
        if abs(fastest - self._keyed_fastest) > 0.25 * max(self._keyed_fastest, 1e-9):
            self._keyed_fastest = fastest
            for p, idx in self.indexes.items():
                if p in SPEED_POLICIES:
                    idx.rebuild(self.members[w] for w in self.eligible)
        index = self.indexes.get(policy)
        if index is None:
            index = (
                LotteryIndex(self.scale, self.rng)
                if policy == P.ROUTING_POLICY_LOTTERY
                else HeapIndex(policy, self.scale)
            )
            for worker_id in self.eligible:
                index.update(self.members[worker_id], True)
            self.indexes[policy] = index
        return index

    def pick(self, policy: int, judge: Judge) -> str | None:
        if not self.eligible:
            return None
        return self.index(policy).pick(judge)
