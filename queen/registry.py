"""The queen's view of the cluster: hives and workers from heartbeats, and the slots it hands out.

Pure logic: no sockets, no sleeping; time comes from an injected clock and
events go to a callback the I/O layer wires to the event bus.

Heartbeats are the truth about which workers exist and in what state; the
queen's own slot count is the truth about slots in use (a heartbeat can be up to
an interval old, so it never overwrites them). Picks go through per-pool
indexes (queen/routing/selection.py), so a pick never scans the fleet.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from apiary.clock import Clock
from apiary.protoutil import READY_STATES, timestamp
from apiary.serving import MAX_RECONNECT_BACKOFF_MS
from protos.v1 import common_pb2, queen_pb2
from queen.beats import host_of, same_host
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
from queen.routing.stats import WorkerStatsTracker

DEGRADED_AFTER_INTERVALS = 2
MAX_POOLS_PER_MODEL = 32
# After (re)starting, the queen waits this many heartbeat intervals for hives (plus the longest
# reconnect backoff of their channels) before it calls a model unknown: a request during that
# time waits instead of getting a false NOT_FOUND.
WARMUP_INTERVALS = 2
WARMUP_RECONNECT = MAX_RECONNECT_BACKOFF_MS / 1000
UNHEALTHY_AFTER_INTERVALS = 3
# Backends whose workers keep computed prompt states: their models default to cache-aware.
CACHING_BACKENDS = frozenset({"llamacpp"})


@dataclass
class RegistrySettings:
    interval: float = 1.0
    # An unhealthy hive (and its workers) is forgotten after this many intervals of silence.
    hive_ttl_intervals: float = 10.0
    # UNSPECIFIED: cache-aware for models served by a backend that keeps prompt states
    # (llamacpp), least-loaded for the rest.
    default_policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED
    # The prefix index's bound (--cache-index-mb).
    cache_index_entries: int = 64_000_000 // ENTRY_BYTES
    breaker_failures: int = 3
    breaker_cooldown: float = 10.0


@dataclass
class HiveEntry:
    id: str
    address: str
    first_seen_wall: float
    last_seen: float
    resources: queen_pb2.HiveResources = field(default_factory=queen_pb2.HiveResources)
    stats: queen_pb2.HiveStats = field(default_factory=queen_pb2.HiveStats)
    worker_ids: set[str] = field(default_factory=set)
    drained: bool = False
    health: common_pb2.HiveHealth.ValueType = common_pb2.HIVE_HEALTH_HEALTHY
    backends: frozenset[str] = frozenset()
    # Models in the hive's catalog -> the backend each needs.
    catalog: dict[str, str] = field(default_factory=dict)
    # The hive process heartbeating under this id (see HiveHeartbeat.instance).
    instance: str = ""
    # What the hive says an operator must fix.
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class WorkerEntry:
    """A worker as the queen knows it: the hive's record and the queen's own counts.

    Plain attributes, not reads of the record: a protobuf string field makes a new str at
    every read, and picks read these on every worker they judge (fixed for the entry's life:
    a worker that moves hive or model gets a new entry)."""

    record: common_pb2.WorkerRecord
    stats: WorkerStatsTracker = field(default_factory=WorkerStatsTracker)
    # Slots the queen has handed out on this worker right now.
    in_flight: int = 0
    # Order of last use (a slot taken or given back); smaller = longer ago.
    last_used: int = 0
    # Set when the queen could not reach the worker; cleared by the next heartbeat that
    # reports it (the hive would have reported its exit).
    unreachable: bool = False
    drained: bool = False
    breaker_until: float = 0.0
    # What changes every beat (cpu, memory, last activity), apart from the record.
    sample: common_pb2.WorkerSample | None = None
    id: str = field(init=False)
    hive_id: str = field(init=False)
    model: str = field(init=False)
    address: str = field(init=False)
    tags: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.id, self.hive_id, self.model = self.record.id, self.record.hive_id, self.record.model
        self.renew(self.record)

    def renew(self, record: common_pb2.WorkerRecord) -> None:
        """The hive's newer record of this worker."""
        self.record, self.address, self.tags = record, record.address, frozenset(record.tags)

    @property
    def slots_total(self) -> int:
        return self.record.slots_total

    @property
    def free_slots(self) -> int:
        return max(self.record.slots_total - self.in_flight, 0)

    @property
    def speed(self) -> float | None:
        return self.stats.speed

    @property
    def success_rate(self) -> float:
        return self.stats.success_rate


@dataclass(frozen=True)
class Slot:
    """One slot on one worker, held by one request (or one direct lease)."""

    worker_id: str
    hive_id: str
    address: str
    model: str


@dataclass
class BeatResult:
    """What applying a hive's report did: channels to close, records not applied and why."""

    removed: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


class HiveTaken(Exception):
    """Another running hive process heartbeats under this id."""


@dataclass(frozen=True)
class Outcome:
    """How a slot's use ended. ok=None: it was never used (cancelled, handed back)."""

    ok: bool | None
    duration: float = 0.0
    tokens: int = 0
    # The worker is to blame (unreachable, crashed mid-stream): counts for the circuit breaker.
    worker_fault: bool = False


class Registry:
    def __init__(
        self,
        clock: Clock,
        settings: RegistrySettings | None = None,
        seed: int | None = None,
        on_event: Callable[[queen_pb2.Event], None] = lambda event: None,
    ) -> None:
        # Called with every cluster event the registry sees (hives, workers, breakers).
        self.on_event = on_event
        self.clock = clock
        self.settings = settings or RegistrySettings()
        self.started = clock.monotonic()
        self.hives: dict[str, HiveEntry] = {}
        self.workers: dict[str, WorkerEntry] = {}
        # Drains outlive the rows they apply to (a queen restart, a hive rejoining).
        self.drained_hives: set[str] = set()
        self.drained_workers: set[str] = set()
        # Workers marked unreachable, until a heartbeat of their hive lists them again.
        self._unreachable: set[str] = set()
        self._by_model: dict[str, set[str]] = {}
        self._pools: dict[str, dict[frozenset[str], Pool]] = {}
        self._use_counter = 0
        self._rng = random.Random(seed)
        # Cache-aware routing: who holds which prompt prefix, demand per prefix, sessions.
        self.prefixes = PrefixIndex(self.settings.cache_index_entries)
        self.demand = Demand()
        self.sessions = Sessions()

    @property
    def interval(self) -> float:
        return self.settings.interval

    # ---- events -----------------------------------------------------------

    def _event(self, kind: queen_pb2.EventKind.ValueType, **fields: object) -> None:
        self.on_event(queen_pb2.Event(kind=kind, time=timestamp(self.clock.time()), **fields))  # type: ignore[arg-type]

    # ---- heartbeats -------------------------------------------------------

    def worker_at(self, address: str) -> tuple[str, str] | None:
        """(hive id, worker id) of the worker listening at `address` (O(workers): it runs
        once per new channel, not per call)."""
        for entry in self.workers.values():
            if entry.record.address == address:
                return entry.record.hive_id, entry.id
        return None

    def known_record(self, hive_id: str, worker_id: str) -> common_pb2.WorkerRecord | None:
        """The record `hive_id` last reported for `worker_id` (None: new, or another's)."""
        entry = self.workers.get(worker_id)
        return entry.record if entry is not None and entry.record.hive_id == hive_id else None

    def apply_heartbeat(
        self,
        beat: queen_pb2.HiveHeartbeat,
        changed: Sequence[common_pb2.WorkerRecord] | None = None,
        host_names: frozenset[str] = frozenset(),
    ) -> BeatResult:
        """Replace what is known about the hive; stamp it with our clock.

        `changed`: the records that differ from what we hold (all of them if None), already
        checked (queen/beats.py). Raises HiveTaken if another live process has the hive's id.
        """
        if beat.leaving:
            hive = self.hives.get(beat.hive_id)
            if hive is not None and hive.instance != beat.instance:
                return BeatResult()  # an older process saying goodbye: not the current one
            return BeatResult(self.remove_hive(beat.hive_id, "the hive is shutting down"))
        hive = self._hive_of(beat)
        result = BeatResult()
        reported = {record.id for record in beat.workers}
        for gone in hive.worker_ids - reported:
            result.removed.append(self.forget_worker(gone))
        for record in beat.workers if changed is None else changed:
            refusal = self._refusal(hive, record, host_names)
            if refusal:
                result.refused.append((record.id, refusal))
            else:
                result.removed.extend(self._upsert(hive, record))
        self._vouch(hive, reported)
        self._take_samples(hive, beat.samples)
        self._take_drains(hive, beat)
        result.removed = [a for a in result.removed if a]
        return result

    def _take_drains(self, hive: HiveEntry, beat: queen_pb2.HiveHeartbeat) -> None:
        """The hive keeps the operators' drains (whichever queen they were sent to): its word
        replaces ours, so every queen agrees, and a restarted one knows them again."""
        self.drain_hive(hive.id, beat.drained)
        drained = frozenset(beat.drained_workers)
        for worker_id in hive.worker_ids:
            self.drain_worker(worker_id, worker_id in drained)

    def _take_samples(self, hive: HiveEntry, samples: Iterable[common_pb2.WorkerSample]) -> None:
        """Figures for display only (never for routing): kept as they come, for known workers
        of this hive; numbers that are not finite read as 0 (see view)."""
        now = self.clock.monotonic()
        for sample in samples:
            entry = self.workers.get(sample.id)
            if entry is not None and entry.record.hive_id == hive.id:
                entry.sample = sample
                if sample.HasField("prefix_cache"):
                    self.prefixes.reported(sample.id, sample.prefix_cache.blocks, now)

    def _hive_of(self, beat: queen_pb2.HiveHeartbeat) -> HiveEntry:
        now = self.clock.monotonic()
        hive = self.hives.get(beat.hive_id)
        if hive is not None and hive.instance != beat.instance:
            if self.health_of(hive) != common_pb2.HIVE_HEALTH_UNHEALTHY:
                raise HiveTaken(
                    f"hive id {beat.hive_id!r} is in use by another running hive process at "
                    f"{hive.address}; stop that one, or give this hive its own --hive-id "
                    "(it is accepted once the other misses 3 heartbeats)"
                )
        if hive is None:
            hive = HiveEntry(beat.hive_id, beat.address, self.clock.time(), now)
            hive.drained = beat.hive_id in self.drained_hives
            self.hives[beat.hive_id] = hive
            self._event(queen_pb2.EVENT_KIND_HIVE_JOINED, hive_id=hive.id, detail=beat.address)
        hive.instance = beat.instance
        hive.address = beat.address
        hive.last_seen = now
        hive.resources = beat.resources
        hive.stats = beat.stats
        hive.backends = frozenset(beat.backends)
        hive.catalog = {entry.model: entry.backend for entry in beat.catalog}
        hive.problems = list(beat.problems)
        was = hive.health
        if was == common_pb2.HIVE_HEALTH_UNHEALTHY and self._note_health(hive) != was:
            # Picks dropped its workers from the indexes while it was silent; an unchanged
            # table re-adds nothing by itself, so put them back now.
            for worker_id in hive.worker_ids:
                self._touch(self.workers[worker_id])
        else:
            self._note_health(hive)
        return hive

    def _refusal(
        self, hive: HiveEntry, record: common_pb2.WorkerRecord, host_names: frozenset[str]
    ) -> str:
        """Why a record may not be applied for `hive` ('' if it may)."""
        owner = self.workers.get(record.id)
        if owner is not None and owner.record.hive_id != hive.id:
            if owner.record.hive_id in self.hives:
                return (
                    f"worker id {record.id} belongs to hive {owner.record.hive_id}; a hive "
                    "speaks only for its own workers"
                )
        if record.address and not same_host(record.address, hive.address, host_names):
            return (
                f"worker {record.id} listens at {record.address}, off its hive's host "
                f"{host_of(hive.address)}; workers must run on their hive's machine"
            )
        return ""

    def _vouch(self, hive: HiveEntry, reported: set[str]) -> None:
        """The hive still lists them: workers we could not reach are worth trying again."""
        for worker_id in reported & self._unreachable:
            entry = self.workers.get(worker_id)
            self._unreachable.discard(worker_id)
            if entry is not None and entry.record.hive_id == hive.id:
                entry.unreachable = False
                self._touch(entry)

    def apply_worker(self, record: common_pb2.WorkerRecord) -> BeatResult:
        """One worker's fresh record from its hive (e.g. a spawn reply), ahead of the heartbeat."""
        hive = self.hives.get(record.hive_id)
        if hive is None:
            return BeatResult()
        refusal = self._refusal(hive, record, frozenset())
        if refusal:
            return BeatResult(refused=[(record.id, refusal)])
        return BeatResult([a for a in self._upsert(hive, record) if a])

    def forget_worker(self, worker_id: str) -> str:
        """Drop a worker (its hive no longer lists it); returns its address."""
        entry = self.workers.pop(worker_id, None)
        if entry is None:
            return ""
        hive = self.hives.get(entry.record.hive_id)
        if hive is not None:
            hive.worker_ids.discard(worker_id)
        for pool in self._pools.get(entry.record.model, {}).values():
            pool.remove(worker_id)
        self.prefixes.remove(worker_id)
        model_ids = self._by_model.get(entry.record.model)
        if model_ids is not None:
            model_ids.discard(worker_id)
            if not model_ids:
                del self._by_model[entry.record.model]
                self._pools.pop(entry.record.model, None)
                self.demand.forget(entry.record.model)
        self._event(
            queen_pb2.EVENT_KIND_WORKER_REMOVED,
            hive_id=entry.record.hive_id,
            worker_id=worker_id,
            model=entry.record.model,
        )
        return entry.record.address

    def _upsert(self, hive: HiveEntry, record: common_pb2.WorkerRecord) -> list[str]:
        removed: list[str] = []
        if record.hive_id != hive.id:
            record.hive_id = hive.id  # a record may leave it out (checked: never another's)
        entry = self.workers.get(record.id)
        if entry is not None and (entry.hive_id != hive.id or entry.model != record.model):
            removed.append(self.forget_worker(record.id))  # moved hive or model: start over
            entry = None
        if entry is None:
            self._use_counter += 1  # never used: least recently used in order of joining
            entry = WorkerEntry(
                record, drained=record.id in self.drained_workers, last_used=self._use_counter
            )
            self.workers[record.id] = entry
            self._by_model.setdefault(record.model, set()).add(record.id)
            self._event(
                queen_pb2.EVENT_KIND_WORKER_JOINED,
                hive_id=hive.id,
                worker_id=record.id,
                model=record.model,
                state=record.state,
            )
        else:
            if entry.record.address != record.address:
                # A new process behind the same id (restarted, or gone): slots on the old one
                # can no longer be given back to it, so its slots start over.
                removed.append(entry.record.address)
                entry.in_flight = 0
            if entry.record.state != record.state:
                self._event(
                    queen_pb2.EVENT_KIND_WORKER_STATE_CHANGED,
                    hive_id=hive.id,
                    worker_id=record.id,
                    model=record.model,
                    state=record.state,
                    previous_state=entry.record.state,
                )
            entry.renew(record)
            entry.unreachable = False
        hive.worker_ids.add(record.id)
        self._touch(entry)
        return removed

    def remove_hive(self, hive_id: str, reason: str) -> list[str]:
        hive = self.hives.pop(hive_id, None)
        if hive is None:
            return []
        removed = [self.forget_worker(wid) for wid in list(hive.worker_ids)]
        self._event(queen_pb2.EVENT_KIND_HIVE_REMOVED, hive_id=hive_id, detail=reason)
        return [a for a in removed if a]

    # ---- health, breakers, ttl --------------------------------------------

    def warming_up(self) -> bool:
        """True until every hive has had the time to heartbeat into a new queen."""
        warmup = WARMUP_INTERVALS * self.settings.interval + WARMUP_RECONNECT
        return self.clock.monotonic() - self.started < warmup

    def heartbeat_age(self, hive: HiveEntry) -> float:
        return max(self.clock.monotonic() - hive.last_seen, 0.0)

    def health_of(self, hive: HiveEntry) -> common_pb2.HiveHealth.ValueType:
        """The hive's health now (cheap: on every pick)."""
        age = self.clock.monotonic() - hive.last_seen
        interval = self.settings.interval
        if age >= UNHEALTHY_AFTER_INTERVALS * interval:
            return common_pb2.HIVE_HEALTH_UNHEALTHY
        if age >= DEGRADED_AFTER_INTERVALS * interval:
            return common_pb2.HIVE_HEALTH_DEGRADED
        return common_pb2.HIVE_HEALTH_HEALTHY

    def hive_health(self, hive: HiveEntry) -> tuple[common_pb2.HiveHealth.ValueType, str]:
        """The hive's health and, unless healthy, why: for operators."""
        age = self.heartbeat_age(hive)
        interval = self.settings.interval
        if age >= UNHEALTHY_AFTER_INTERVALS * interval:
            return (
                common_pb2.HIVE_HEALTH_UNHEALTHY,
                f"no heartbeat for {age:.1f}s (unhealthy after {UNHEALTHY_AFTER_INTERVALS} "
                f"intervals of {interval:g}s; not routed to)",
            )
        if age >= DEGRADED_AFTER_INTERVALS * interval:
            return (
                common_pb2.HIVE_HEALTH_DEGRADED,
                f"no heartbeat for {age:.1f}s (degraded after {DEGRADED_AFTER_INTERVALS} "
                f"intervals of {interval:g}s; routed to last)",
            )
        return common_pb2.HIVE_HEALTH_HEALTHY, ""

    def _note_health(self, hive: HiveEntry) -> common_pb2.HiveHealth.ValueType:
        health = self.health_of(hive)
        if health != hive.health:
            reason = self.hive_health(hive)[1]
            if (
                hive.health == common_pb2.HIVE_HEALTH_HEALTHY
                and health == common_pb2.HIVE_HEALTH_UNHEALTHY
            ):
                # Noticed late (a busy loop): it went through degraded on the way; say so, so
                # watchers always see the same sequence.
                self._event(
                    queen_pb2.EVENT_KIND_HIVE_HEALTH_CHANGED,
                    hive_id=hive.id,
                    health=common_pb2.HIVE_HEALTH_DEGRADED,
                    detail=f"missed {DEGRADED_AFTER_INTERVALS} heartbeat intervals",
                )
            hive.health = health
            self._event(
                queen_pb2.EVENT_KIND_HIVE_HEALTH_CHANGED,
                hive_id=hive.id,
                health=health,
                detail=reason or "heartbeats arrive again",
            )
        return health

    def sweep(self) -> list[str]:
        """Periodic: health transitions, hives past their TTL, circuit breakers that cooled down.

        Returns the addresses of removed workers.
        """
        now = self.clock.monotonic()
        removed: list[str] = []
        ttl = self.settings.hive_ttl_intervals * self.settings.interval
        for hive in list(self.hives.values()):
            self._note_health(hive)
            if self.heartbeat_age(hive) >= ttl:
                removed += self.remove_hive(hive.id, f"no heartbeat for {ttl:g}s (TTL)")
        for entry in self.workers.values():
            if entry.breaker_until and now >= entry.breaker_until:
                entry.breaker_until = 0.0
                # Half-open: one more failure opens it again at once.
                entry.stats.consecutive_failures = self.settings.breaker_failures - 1
                self._event(
                    queen_pb2.EVENT_KIND_WORKER_CIRCUIT_CLOSED,
                    worker_id=entry.id,
                    hive_id=entry.record.hive_id,
                    model=entry.record.model,
                )
                self._touch(entry)
        return removed

    # ---- drain ------------------------------------------------------------

    def drain_hive(self, hive_id: str, drained: bool) -> None:
        (self.drained_hives.add if drained else self.drained_hives.discard)(hive_id)
        hive = self.hives.get(hive_id)
        if hive is not None and hive.drained != drained:
            hive.drained = drained
            kind = (
                queen_pb2.EVENT_KIND_HIVE_DRAINED
                if drained
                else queen_pb2.EVENT_KIND_HIVE_UNDRAINED
            )
            self._event(kind, hive_id=hive_id)
            for worker_id in hive.worker_ids:
                self._touch(self.workers[worker_id])

    def drain_worker(self, worker_id: str, drained: bool) -> None:
        (self.drained_workers.add if drained else self.drained_workers.discard)(worker_id)
        entry = self.workers.get(worker_id)
        if entry is not None and entry.drained != drained:
            entry.drained = drained
            kind = (
                queen_pb2.EVENT_KIND_WORKER_DRAINED
                if drained
                else queen_pb2.EVENT_KIND_WORKER_UNDRAINED
            )
            self._event(
                kind, worker_id=worker_id, hive_id=entry.record.hive_id, model=entry.record.model
            )
            self._touch(entry)

    def is_drained(self, entry: WorkerEntry) -> bool:
        hive = self.hives.get(entry.hive_id)
        return entry.drained or (hive is not None and hive.drained)

    # ---- routing ----------------------------------------------------------

    def routable(self, entry: WorkerEntry) -> bool:
        """Everything but hive health (judged at pick time, as it changes with time alone)."""
        return (
            entry.record.state in READY_STATES
            and entry.free_slots > 0
            and not entry.unreachable
            and not entry.breaker_until
            and not self.is_drained(entry)
        )

    def _touch(self, entry: WorkerEntry) -> None:
        """Re-key the worker in every pool of its model."""
        eligible = self.routable(entry)
        pools = self._pools.get(entry.model)
        if pools is None:
            self._pool(entry.model, frozenset())
            return
        for pool in pools.values():
            if pool.admits(entry.tags):
                pool.update(entry, eligible)
            elif entry.id in pool.members:
                pool.remove(entry.id)  # a tag the worker no longer carries

    def _pool(self, model: str, tags: frozenset[str]) -> Pool:
        pools = self._pools.setdefault(model, {})
        pool = pools.get(tags)
        if pool is None:
            pool = Pool(model, tags, self._rng)
            for worker_id in self._by_model.get(model, ()):
                entry = self.workers[worker_id]
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
        def judge(worker_id: str) -> Verdict:
            entry = self.workers[worker_id]
            hive = self.hives.get(entry.hive_id)
            if hive is None:
                return Verdict.DROP
            health = self._note_health(hive)
            if health == common_pb2.HIVE_HEALTH_UNHEALTHY:
                return Verdict.DROP  # until the hive's next heartbeat re-adds it
            if entry.address in exclude:
                return Verdict.SKIP
            if health == common_pb2.HIVE_HEALTH_DEGRADED:
                return Verdict.LATER
            return Verdict.TAKE

        return judge

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
        return common_pb2.ROUTING_POLICY_LEAST_LOADED

    def _members(self, pool: Pool | None) -> Iterator[WorkerEntry]:
        for worker_id in pool.members if pool is not None else ():
            yield self.workers[worker_id]

    def take_slot(
        self,
        model: str,
        exclude: Iterable[str] = (),
        policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED,
        tags: Iterable[str] = (),
        want: Want | None = None,
        affinity: bool = True,
    ) -> Slot | None:
        """Take a slot on the best free worker of `model` carrying `tags`, or None.

        `exclude` holds worker addresses already tried for this request. Cache-aware picks
        read `want` (the request's prefix and session) and may return None with free workers
        left, to wait for a busy one holding the prefix — unless `affinity` is off (the
        request waited long enough for one).
        """
        if model not in self._by_model:
            return None
        pool = self._pool(model, frozenset(tags))
        policy = self.policy_for(model, policy)
        judge = self._judge(frozenset(exclude))
        if policy == common_pb2.ROUTING_POLICY_CACHE_AWARE and want is not None:
            worker_id, wait = self._cache_pick(pool, want, judge)
            if worker_id is None and wait and affinity:
                return None
            worker_id = worker_id or pool.pick(common_pb2.ROUTING_POLICY_LEAST_LOADED, judge)
            if worker_id is not None:
                self._routed(model, worker_id, want)
        else:
            worker_id = pool.pick(policy, judge)
        if worker_id is None:
            return None
        entry = self.workers[worker_id]
        entry.in_flight += 1
        self._use_counter += 1
        entry.last_used = self._use_counter
        self._touch(entry)
        return Slot(entry.id, entry.hive_id, entry.address, model)

    def _cache_pick(self, pool: Pool, want: Want, judge: Judge) -> tuple[str | None, bool]:
        """(a worker to take, or None; whether a busy holder is worth waiting for)."""
        now = self.clock.monotonic()
        hashes = want.hashes
        matches = self.prefixes.match(hashes, now, least_match(len(hashes))) if hashes else {}
        session = self.sessions.get(want.session)
        if not matches and session is None:
            return None, False

        def usable(worker_id: str) -> WorkerEntry | None:
            entry = self.workers.get(worker_id)
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
            entry = self.workers[worker_id]
            return entry.in_flight / max(entry.slots_total, 1), entry.last_used

        def lightest() -> float:
            worker_id = pool.pick(common_pb2.ROUTING_POLICY_LEAST_LOADED, judge)
            return load(worker_id)[0] if worker_id is not None else 1.0

        wanted = self.demand.holders_wanted(pool.model, want.family, len(pool.members))
        workers = Candidates(free, busy, load, lightest)
        choice = choose(matches, len(hashes), workers, wanted, session)
        return choice.take, bool(choice.wait_for)

    def is_busy(self, entry: WorkerEntry) -> bool:
        """Ready and reachable, with every slot in use: worth waiting for."""
        return (
            entry.record.state in READY_STATES
            and entry.free_slots == 0
            and not entry.unreachable
            and not entry.breaker_until
            and not self.is_drained(entry)
        )

    def _routed(self, model: str, worker_id: str, want: Want) -> None:
        """A cache-aware pick went to `worker_id`: it will hold the request's prefix."""
        if want.hashes:
            self.prefixes.routed(worker_id, want.hashes, self.clock.monotonic())
        self.sessions.stick(want.session, worker_id)
        self.demand.note(model, want.family)

    def give_back(self, slot: Slot, outcome: Outcome) -> None:
        """Give the slot back and count the outcome; a slot on a worker since gone is dropped."""
        entry = self.workers.get(slot.worker_id)
        if entry is None or entry.address != slot.address:
            return
        entry.in_flight = max(entry.in_flight - 1, 0)
        self._use_counter += 1
        entry.last_used = self._use_counter
        if outcome.ok is not None:
            entry.stats.record(outcome.ok, outcome.duration, outcome.tokens)
        if outcome.ok is False and not outcome.worker_fault:
            entry.stats.consecutive_failures = 0  # not the worker's doing
        threshold = self.settings.breaker_failures
        if outcome.worker_fault and threshold and entry.stats.consecutive_failures >= threshold:
            if not entry.breaker_until:
                self._event(
                    queen_pb2.EVENT_KIND_WORKER_CIRCUIT_OPENED,
                    worker_id=entry.id,
                    hive_id=entry.record.hive_id,
                    model=entry.record.model,
                    detail=f"{entry.stats.consecutive_failures} failures in a row",
                )
            entry.breaker_until = self.clock.monotonic() + self.settings.breaker_cooldown
        self._touch(entry)

    def mark_unreachable(self, worker_id: str) -> None:
        """Stop routing to a worker we failed to reach until its hive vouches for it again."""
        entry = self.workers.get(worker_id)
        if entry is not None:
            entry.unreachable = True
            self._unreachable.add(worker_id)
            self._touch(entry)

    # ---- queries ----------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(self._by_model)

    def catalog_hives(self, model: str) -> list[HiveEntry]:
        """Hives that have `model` in their catalog (O(hives): for listings and autospawn)."""
        return [hive for hive in self.hives.values() if model in hive.catalog]

    def catalog_models(self) -> set[str]:
        return {model for hive in self.hives.values() for model in hive.catalog}

    def has_model(self, model: str) -> bool:
        return model in self._by_model

    def pool_size(self, model: str, tags: frozenset[str]) -> int:
        """Workers of `model` (any state) carrying `tags` (without building a pool for them)."""
        pool = self._pools.get(model, {}).get(tags)
        if pool is not None:
            return len(pool.members)
        return sum(1 for w in self.workers_of_model(model) if tags.issubset(w.record.tags))

    def has_free(self, model: str) -> bool:
        pool = self._pools.get(model, {}).get(frozenset())
        return pool is not None and bool(pool.eligible)

    def workers_of_model(self, model: str) -> Iterator[WorkerEntry]:
        for worker_id in self._by_model.get(model, ()):
            yield self.workers[worker_id]

    def workers_of_hive(self, hive_id: str) -> Iterator[WorkerEntry]:
        hive = self.hives.get(hive_id)
        for worker_id in hive.worker_ids if hive else ():
            yield self.workers[worker_id]

    def view(self, entry: WorkerEntry) -> common_pb2.WorkerRecord:
        """The record as operators see it: the hive's report with the queen's own knowledge."""
        out = common_pb2.WorkerRecord()
        out.CopyFrom(entry.record)
        if out.state in READY_STATES:
            out.state = (
                common_pb2.WORKER_STATE_BUSY if entry.in_flight else common_pb2.WORKER_STATE_IDLE
            )
            out.slots_available = entry.free_slots
        if entry.sample is not None:
            sample = entry.sample
            out.cpu_percent = sample.cpu_percent if math.isfinite(sample.cpu_percent) else 0.0
            out.rss_bytes = sample.rss_bytes
            out.last_activity.CopyFrom(sample.last_activity)
            if sample.HasField("prefix_cache"):
                out.prefix_cache.CopyFrom(sample.prefix_cache)
        stats = entry.stats
        out.requests_completed = stats.completed
        out.requests_failed = stats.failed
        hive = self.hives.get(entry.record.hive_id)
        if hive is not None:
            out.hive_health = self.hive_health(hive)[0]
            out.heartbeat_age_seconds = self.heartbeat_age(hive)
        out.drained = self.is_drained(entry)
        if entry.breaker_until:
            out.circuit_open_seconds = max(entry.breaker_until - self.clock.monotonic(), 0.0)
        if entry.unreachable and not out.failure_reason:
            out.failure_reason = "queen could not reach the worker"
        pool = self._pools.get(entry.record.model, {}).get(frozenset())
        out.stats.CopyFrom(
            common_pb2.WorkerStats(
                mean_duration_seconds=stats.mean_duration,
                p50_duration_seconds=stats.p50_duration,
                tokens_per_second=stats.speed or 0.0,
                success_rate=stats.success_rate,
                consecutive_failures=stats.consecutive_failures,
                score=score(entry, pool.scale if pool else SpeedScale()),
            )
        )
        return out
