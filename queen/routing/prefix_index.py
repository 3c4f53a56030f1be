"""Which worker holds which prompt prefix, and the cache-aware pick made from it. Pure.

The index maps a block hash (apiary/prefix.py: one hash names a whole prefix) to the
workers holding that prefix. It learns from two sources: what the queen routed (a worker that
served a request holds its prefix: provisional, until the worker says so or PROVISIONAL
seconds pass) and what workers report (their resident prefixes, each health interval:
authoritative, so a prefix a worker evicted leaves the index). Its size is bounded
(max_entries, least recently touched first out); a worker that leaves takes its entries.

The pick (`choose`): a session's worker while it can serve; else the workers holding the
longest prefix (within a small slack), least loaded first — unless the load guard finds that
one much busier than the least-loaded worker (MAX_IMBALANCE of its slots), then least-loaded.
If they are all busy, the request waits for one of them (for at most the queen's
--cache-wait), unless the prefix is hot: a
prefix asked for by a share s of recent requests wants ceil(s x workers) holders, and until it
has them a busy holder is not waited for — the least-loaded free worker takes the request and
becomes one more holder. Short prompts and misses go least-loaded.
"""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from apiary.prefix import request_chain
from protos.v1 import common_pb2

# Seconds a routed prefix counts as held before the worker's own report confirms it.
PROVISIONAL = 10.0
# Roughly what one (hash, worker) entry costs in memory, for --cache-index-mb.
ENTRY_BYTES = 160
# A match must cover this share of the request's blocks (SGLang's gateway uses 30% too).
MIN_MATCH_SHARE = 0.3
# Requests with a prefix this many blocks long or longer are grouped by it for demand.
FAMILY_BLOCKS = 4
# Recent requests per model over which a prefix's share of demand is counted, and how many
# there must be before a share says anything (one request is 100% of one).
DEMAND_WINDOW = 64
DEMAND_MIN = 8
MAX_SESSIONS = 100_000
# The load guard: a holder whose share of slots in use exceeds the least-loaded free worker's
# by more than this is passed over (least-loaded instead), its prefix notwithstanding.
MAX_IMBALANCE = 0.5
CONFIRMED = math.inf


@dataclass
class Want:
    """What a cache-aware pick reads of a request: its prefix hashes (computed only if the
    pick needs them) and its session."""

    request: common_pb2.InferRequest | None = None
    session: str = ""

    @cached_property
    def hashes(self) -> tuple[int, ...]:
        return tuple(request_chain(self.request)) if self.request is not None else ()

    @property
    def family(self) -> int | None:
        hashes = self.hashes
        return hashes[min(FAMILY_BLOCKS, len(hashes)) - 1] if hashes else None


@dataclass
class PrefixIndex:
    max_entries: int = 400_000
    _holders: OrderedDict[int, dict[str, float]] = field(default_factory=OrderedDict)
    _held: dict[str, set[int]] = field(default_factory=dict)
    # The blocks each worker last reported, to skip an unchanged report cheaply.
    _reported: dict[str, list[int]] = field(default_factory=dict)
    entries: int = 0

    def routed(self, worker_id: str, hashes: Iterable[int], now: float) -> None:
        """The worker took a request with these hashes: it holds them soon."""
        held = self._held.setdefault(worker_id, set())
        until = now + PROVISIONAL
        index = self._holders
        # On every cache-aware pick (bench/scale.py): _entry inlined.
        for block in hashes:
            holders = index.get(block)
            if holders is None:
                holders = index[block] = {}
            else:
                index.move_to_end(block)
            current = holders.get(worker_id)
            if current is None:
                self.entries += 1
                held.add(block)
            if current != CONFIRMED:
                holders[worker_id] = until
        self._evict()

    def reported(self, worker_id: str, blocks: Sequence[int], now: float) -> None:
        """The worker's own list of what it holds: its entries become exactly these (and
        routed ones not yet due to show up in a report)."""
        listed = list(blocks)
        if self._reported.get(worker_id) == listed:
            return
        self._reported[worker_id] = listed
        held = self._held.setdefault(worker_id, set())
        fresh = set(listed)
        for block in held - fresh:
            until = self._holders.get(block, {}).get(worker_id)
            # Gone from the worker (it evicted it), or routed long enough ago to show by now.
            if until is not None and (until == CONFIRMED or until <= now):
                self._drop(block, worker_id)
        for block in fresh:
            holders = self._entry(block)
            self.entries += worker_id not in holders
            holders[worker_id] = CONFIRMED
            held.add(block)
        self._evict()

    def remove(self, worker_id: str) -> None:
        """The worker left: none of its entries stay."""
        for block in list(self._held.get(worker_id, ())):
            self._drop(block, worker_id)
        self._held.pop(worker_id, None)
        self._reported.pop(worker_id, None)

    def match(self, hashes: Sequence[int], now: float, least: int = 1) -> dict[str, int]:
        """Worker -> how many leading blocks of `hashes` it holds (those holding `least` or
        more)."""
        found: dict[str, int] = {}
        expired: list[tuple[int, str]] = []
        index = self._holders
        for depth in range(len(hashes), max(least, 1) - 1, -1):
            block = hashes[depth - 1]
            holders = index.get(block)
            if not holders:
                continue
            index.move_to_end(block)
            for worker_id, until in holders.items():
                if until < now:
                    expired.append((block, worker_id))  # routed, never confirmed
                elif worker_id not in found:
                    found[worker_id] = depth
        for block, worker_id in expired:
            self._drop(block, worker_id)
        return found

    def holders_of(self, block: int) -> int:
        return len(self._holders.get(block, ()))

    def _entry(self, block: int) -> dict[str, float]:
        holders = self._holders.get(block)
        if holders is None:
            holders = self._holders[block] = {}
        else:
            self._holders.move_to_end(block)
        return holders

    def _drop(self, block: int, worker_id: str) -> None:
        holders = self._holders.get(block)
        if holders is not None and holders.pop(worker_id, None) is not None:
            self.entries -= 1
            if not holders:
                del self._holders[block]
        held = self._held.get(worker_id)
        if held is not None:
            held.discard(block)

    def _evict(self) -> None:
        while self.entries > self.max_entries and self._holders:
            block, holders = self._holders.popitem(last=False)
            self.entries -= len(holders)
            for worker_id in holders:
                held = self._held.get(worker_id)
                if held is not None:
                    held.discard(block)


@dataclass
class Demand:
    """Each model's recent requests by prefix family: how many holders a prefix wants."""

    _recent: dict[str, deque[int]] = field(default_factory=dict)
    _counts: dict[str, Tally[int]] = field(default_factory=dict)

    def note(self, model: str, family: int | None) -> None:
        if family is None:
            return
        recent = self._recent.setdefault(model, deque())
        counts = self._counts.setdefault(model, Tally())
        recent.append(family)
        counts[family] += 1
        if len(recent) > DEMAND_WINDOW:
            old = recent.popleft()
            counts[old] -= 1
            if not counts[old]:
                del counts[old]

    def holders_wanted(self, model: str, family: int | None, workers: int) -> int:
        recent = self._recent.get(model)
        if family is None or not recent or len(recent) < DEMAND_MIN:
            return 1
        share = self._counts[model][family] / len(recent)
        return max(1, min(workers, math.ceil(share * workers)))

    def forget(self, model: str) -> None:
        self._recent.pop(model, None)
        self._counts.pop(model, None)


@dataclass
class Sessions:
    """session id -> the worker its last request went to (bounded, oldest out)."""

    _workers: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def get(self, session: str) -> str | None:
        return self._workers.get(session) if session else None

    def stick(self, session: str, worker_id: str) -> None:
        if not session:
            return
        self._workers[session] = worker_id
        self._workers.move_to_end(session)
        while len(self._workers) > MAX_SESSIONS:
            self._workers.popitem(last=False)


@dataclass(frozen=True)
class Choice:
    """take: a free worker to serve now. wait_for: busy workers worth waiting for. Neither:
    any free worker will do (least-loaded)."""

    take: str | None = None
    wait_for: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Candidates:
    """What the pick knows of the workers it may use (judged by the registry)."""

    free: Callable[[str], bool]
    busy: Callable[[str], bool]
    # Smaller is better: slots in use (as a share), then least recently used.
    load: Callable[[str], tuple[float, int]]
    # The share of slots in use on the least-loaded free worker (1.0: none free).
    lightest: Callable[[], float] = lambda: 1.0

    def overloaded(self, worker_id: str) -> bool:
        """The load guard: this worker is much busier than the least-loaded one."""
        return self.load(worker_id)[0] - self.lightest() > MAX_IMBALANCE


def least_match(blocks: int) -> int:
    """The fewest leading blocks of a `blocks`-long request a holder must have to count."""
    return max(1, math.ceil(MIN_MATCH_SHARE * blocks))


def choose(
    matches: dict[str, int], blocks: int, workers: Candidates, holders_wanted: int,
    session_worker: str | None = None,
) -> Choice:  # fmt: skip
    """The cache-aware pick (see the module docstring)."""
    if session_worker is not None:
        if workers.free(session_worker):
            if not workers.overloaded(session_worker):
                return Choice(take=session_worker)
        elif workers.busy(session_worker):
            return Choice(wait_for=frozenset({session_worker}))
    least = least_match(blocks)
    good = {w: d for w, d in matches.items() if d >= least and (workers.free(w) or workers.busy(w))}
    if not good:
        return Choice()
    best = max(good.values())
    top = [w for w, d in good.items() if d >= best - max(1, best // 10)]
    free = [w for w in top if workers.free(w)]
    if free:
        chosen = min(free, key=workers.load)
        # Imbalanced (a holder with most slots taken, another worker idle): least-loaded.
        return Choice() if workers.overloaded(chosen) else Choice(take=chosen)
    if len(good) < holders_wanted:
        return Choice()  # a hot prefix: one more worker computes it
    return Choice(wait_for=frozenset(top))
