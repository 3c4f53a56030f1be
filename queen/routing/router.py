"""The picks: which free worker takes a request, the queen's own slot counts, and the circuit
breakers those counts trip.

Pure logic: no sockets, no sleeping; time comes from the registry's clock. The router keeps its
indexes (per-pool indexes, queen/routing/selection.py; the prefix index) from the registry's
changes (it is the registry's Watcher), so a pick never scans the fleet. A pick emits no event:
a hive whose health changed since it was last judged is reported through `on_health` (the
cluster wires it to the registry, which says so), and only breakers, which the router owns, are
announced through `on_event`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from apiary.protoutil import READY_STATES, timestamp
from protos.v1 import common_pb2, queen_pb2
from queen.members import HiveEntry, WorkerEntry
from queen.registry import Registry
from queen.routing.ask import Ask, Outcome, Slot
from queen.routing.prefix_index import (
    ENTRY_BYTES,
    Candidates,
    Demand,
    PrefixIndex,
    Sessions,
    Want,
    choose,
    least_match,
)
from queen.routing.selection import Judge, Pool, SpeedScale, Verdict, score

MAX_POOLS_PER_MODEL = 32
# Backends whose workers keep computed prompt states: their models default to cache-aware.
CACHING_BACKENDS = frozenset({"llamacpp"})
LEAST_LOADED = common_pb2.ROUTING_POLICY_LEAST_LOADED


@dataclass
class RoutingSettings:
    # UNSPECIFIED: cache-aware for models served by a backend that keeps prompt states
    # (llamacpp), least-loaded for the rest.
    default_policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED
    # The prefix index's bound (--cache-index-mb).
    cache_index_entries: int = 64_000_000 // ENTRY_BYTES
    breaker_failures: int = 3
    breaker_cooldown: float = 10.0


class Router:
    def __init__(
        self,
        registry: Registry,
        settings: RoutingSettings | None = None,
        seed: int | None = None,
        on_event: Callable[[queen_pb2.Event], None] = lambda event: None,
        on_health: Callable[[HiveEntry], object] = lambda hive: None,
    ) -> None:
        self.registry = registry
        self.settings = settings or RoutingSettings()
        # Breakers opened and closed; and a hive found in another health than last said.
        self.on_event = on_event
        self.on_health = on_health
        self._pools: dict[str, dict[frozenset[str], Pool]] = {}
        self._use_counter = 0
        self._rng = random.Random(seed)
        # Cache-aware routing: who holds which prompt prefix, demand per prefix, sessions.
        self.prefixes = PrefixIndex(self.settings.cache_index_entries)
        self.demand = Demand()
        self.sessions = Sessions()
        registry.watcher = self
        for entry in registry.workers.values():  # a registry that already knows workers
            self.changed(entry)

    # ---- the registry's changes (Watcher) -----------------------------------

    def changed(self, entry: WorkerEntry) -> None:
        """Re-key the worker in every pool of its model."""
        if not entry.last_used:
            self._use_counter += 1  # never used: least recently used in order of joining
            entry.last_used = self._use_counter
        pools = self._pools.get(entry.model)
        if pools is None:
            self._pool(entry.model, frozenset())
            return
        eligible = self.routable(entry)
        for pool in pools.values():
            if pool.admits(entry.tags):
                pool.update(entry, eligible)
            elif entry.id in pool.members:
                pool.remove(entry.id)  # a tag the worker no longer carries

    def removed(self, entry: WorkerEntry, last_of_model: bool) -> None:
        for pool in self._pools.get(entry.model, {}).values():
            pool.remove(entry.id)
        self.prefixes.remove(entry.id)
        if last_of_model:
            self._pools.pop(entry.model, None)
            self.demand.forget(entry.model)

    def sampled(self, entry: WorkerEntry, sample: common_pb2.WorkerSample) -> None:
        if sample.HasField("prefix_cache"):
            now = self.registry.clock.monotonic()
            self.prefixes.reported(entry.id, sample.prefix_cache.blocks, now)

    # ---- eligibility ------------------------------------------------------------

    def routable(self, entry: WorkerEntry) -> bool:
        """Everything but hive health (judged at pick time, as it changes with time alone)."""
        return entry.free_slots > 0 and self._usable(entry)

    def is_busy(self, entry: WorkerEntry) -> bool:
        """Ready and reachable, with every slot in use: worth waiting for."""
        return entry.free_slots == 0 and self._usable(entry)

    def _usable(self, entry: WorkerEntry) -> bool:
        return (
            entry.record.state in READY_STATES
            and not entry.unreachable
            and not entry.breaker_until
            and not self.registry.is_drained(entry)
        )

    def _pool(self, model: str, tags: frozenset[str]) -> Pool:
        pools = self._pools.setdefault(model, {})
        pool = pools.get(tags)
        if pool is None:
            pool = Pool(model, tags, self._rng)
            for entry in self.registry.workers_of_model(model):
                if pool.admits(entry.tags):
                    pool.update(entry, self.routable(entry))
            if len(pools) >= MAX_POOLS_PER_MODEL:
                # Every worker change updates every pool of its model, and clients choose the
                # tag sets: keep their number bounded. The oldest tagged pool goes (it is rebuilt
                # if asked for again); the untagged pool stays.
                oldest = next(t for t in pools if t)
                del pools[oldest]
            pools[tags] = pool
        return pool

    def _judge(self, exclude: frozenset[str]) -> Judge:
        registry = self.registry

        def judge(worker_id: str) -> Verdict:
            entry = registry.workers[worker_id]
            hive = registry.hives.get(entry.hive_id)
            if hive is None:
                return Verdict.DROP
            health = registry.health_of(hive)
            if health != hive.health:
                self.on_health(hive)
            if health == common_pb2.HIVE_HEALTH_UNHEALTHY:
                return Verdict.DROP  # until the hive's next heartbeat re-adds it
            if entry.address in exclude:
                return Verdict.SKIP
            if health == common_pb2.HIVE_HEALTH_DEGRADED:
                return Verdict.LATER
            return Verdict.TAKE

        return judge

    # ---- picks ------------------------------------------------------------------

    def policy_for(
        self, model: str, policy: common_pb2.RoutingPolicy.ValueType
    ) -> common_pb2.RoutingPolicy.ValueType:
        """The request's policy, else the queen's, else the model's own default."""
        policy = policy or self.settings.default_policy
        if policy:
            return policy
        pool = self._pools.get(model, {}).get(frozenset())
        backend = next((w.record.backend for w in self._members(pool)), "")
        if backend in CACHING_BACKENDS:
            return common_pb2.ROUTING_POLICY_CACHE_AWARE
        return LEAST_LOADED

    def _members(self, pool: Pool | None) -> Iterator[WorkerEntry]:
        for worker_id in pool.members if pool is not None else ():
            yield self.registry.workers[worker_id]

    def take(self, ask: Ask, affinity: bool = True) -> Slot | None:
        """Take a slot on the best free worker for `ask`, or None.

        Cache-aware picks read `ask.want` and may return None with free workers left, to wait
        for a busy one holding the prefix — unless `affinity` is off (the request waited long
        enough for one).
        """
        model = ask.model
        if not self.registry.has_model(model):
            return None
        pool = self._pool(model, ask.tags)
        policy = self.policy_for(model, ask.policy)
        judge = self._judge(ask.exclude)
        if policy == common_pb2.ROUTING_POLICY_CACHE_AWARE and ask.want is not None:
            worker_id, wait = self._cache_pick(pool, ask.want, judge)
            if worker_id is None and wait and affinity:
                return None
            worker_id = worker_id or pool.pick(LEAST_LOADED, judge)
            if worker_id is not None:
                self._routed(model, worker_id, ask.want)
        else:
            worker_id = pool.pick(policy, judge)
        if worker_id is None:
            return None
        entry = self.registry.workers[worker_id]
        entry.in_flight += 1
        self._used(entry)
        return Slot(entry.id, entry.hive_id, entry.address, model, policy)

    def _used(self, entry: WorkerEntry) -> None:
        self._use_counter += 1
        entry.last_used = self._use_counter
        self.changed(entry)

    def _cache_pick(self, pool: Pool, want: Want, judge: Judge) -> tuple[str | None, bool]:
        """(a worker to take, or None; whether a busy holder is worth waiting for)."""
        workers = self.registry.workers
        hashes = want.hashes
        now = self.registry.clock.monotonic()
        matches = self.prefixes.match(hashes, now, least_match(len(hashes))) if hashes else {}
        session = self.sessions.get(want.session)
        if not matches and session is None:
            return None, False

        def usable(worker_id: str) -> WorkerEntry | None:
            entry = workers.get(worker_id)
            if entry is None or worker_id not in pool.members or judge(worker_id) in (
                Verdict.DROP, Verdict.SKIP,
            ):  # fmt: skip
                return None
            return entry

        def free(worker_id: str) -> bool:
            return worker_id in pool.eligible and usable(worker_id) is not None

        def busy(worker_id: str) -> bool:
            entry = usable(worker_id)
            return entry is not None and self.is_busy(entry)

        def load(worker_id: str) -> tuple[float, int]:
            entry = workers[worker_id]
            return entry.in_flight / max(entry.slots_total, 1), entry.last_used

        def lightest() -> float:
            worker_id = pool.pick(LEAST_LOADED, judge)
            return load(worker_id)[0] if worker_id is not None else 1.0

        wanted = self.demand.holders_wanted(pool.model, want.family, len(pool.members))
        choice = choose(matches, len(hashes), Candidates(free, busy, load, lightest), wanted,
                        session)  # fmt: skip
        return choice.take, bool(choice.wait_for)

    def _routed(self, model: str, worker_id: str, want: Want) -> None:
        """A cache-aware pick went to `worker_id`: it will hold the request's prefix."""
        if want.hashes:
            self.prefixes.routed(worker_id, want.hashes, self.registry.clock.monotonic())
        self.sessions.stick(want.session, worker_id)
        self.demand.note(model, want.family)

    # ---- slots back, breakers ---------------------------------------------------

    def give_back(self, slot: Slot, outcome: Outcome) -> None:
        """Give the slot back and count the outcome; a slot on a worker since gone is dropped."""
        entry = self.registry.workers.get(slot.worker_id)
        if entry is None or entry.address != slot.address:
            return
        entry.in_flight = max(entry.in_flight - 1, 0)
        if outcome.ok is not None:
            entry.stats.record(outcome.ok, outcome.duration, outcome.tokens)
        if outcome.ok is False and not outcome.worker_fault:
            entry.stats.consecutive_failures = 0  # not the worker's doing
        threshold = self.settings.breaker_failures
        if outcome.worker_fault and threshold and entry.stats.consecutive_failures >= threshold:
            if not entry.breaker_until:
                detail = f"{entry.stats.consecutive_failures} failures in a row"
                self._breaker_event(queen_pb2.EVENT_KIND_WORKER_CIRCUIT_OPENED, entry, detail)
            clock = self.registry.clock
            entry.breaker_until = clock.monotonic() + self.settings.breaker_cooldown
        self._used(entry)

    def sweep(self) -> None:
        """Periodic: circuit breakers that cooled down go half-open."""
        now = self.registry.clock.monotonic()
        for entry in self.registry.workers.values():
            if entry.breaker_until and now >= entry.breaker_until:
                entry.breaker_until = 0.0
                # Half-open: one more failure opens it again at once.
                entry.stats.consecutive_failures = self.settings.breaker_failures - 1
                self._breaker_event(queen_pb2.EVENT_KIND_WORKER_CIRCUIT_CLOSED, entry, "")
                self.changed(entry)

    def _breaker_event(
        self, kind: queen_pb2.EventKind.ValueType, entry: WorkerEntry, detail: str
    ) -> None:
        self.on_event(
            queen_pb2.Event(
                kind=kind,
                time=timestamp(self.registry.clock.time()),
                worker_id=entry.id,
                hive_id=entry.hive_id,
                model=entry.model,
                detail=detail,
            )
        )

    # ---- queries ----------------------------------------------------------------

    def ready(self, entry: WorkerEntry) -> bool:
        """The worker would take a request now or queue one for it (busy counts): usable, on a
        hive that is not unhealthy."""
        hive = self.registry.hives.get(entry.hive_id)
        return (
            self._usable(entry)
            and hive is not None
            and self.registry.health_of(hive) != common_pb2.HIVE_HEALTH_UNHEALTHY
        )

    def model_ready(self, model: str) -> bool:
        """A request for `model` would be served or queued now (what /ready answers)."""
        return any(map(self.ready, self.registry.workers_of_model(model)))

    def routing_problem(self) -> str | None:
        """Why no request is routed now (None: some are), in words a load balancer's operator
        can act on that tell nothing else of the cluster (what /health answers, with the
        service's own 'draining')."""
        registry = self.registry
        if any(map(self.ready, registry.workers.values())):
            return None
        if registry.warming_up():
            return "starting: the hives have not all reported yet"
        return "no worker is ready" if registry.workers else "no worker is registered"

    def has_free(self, model: str) -> bool:
        pool = self._pools.get(model, {}).get(frozenset())
        return pool is not None and bool(pool.eligible)

    def pool_size(self, model: str, tags: frozenset[str]) -> int:
        """Workers of `model` (any state) carrying `tags` (without building a pool for them)."""
        pool = self._pools.get(model, {}).get(tags)
        if pool is not None:
            return len(pool.members)
        return sum(1 for w in self.registry.workers_of_model(model) if tags <= w.tags)

    def score(self, entry: WorkerEntry) -> float:
        """The worker's score against the speeds of its model's workers (operator view)."""
        pool = self._pools.get(entry.model, {}).get(frozenset())
        return score(entry, pool.scale if pool is not None else SpeedScale())
