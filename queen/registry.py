"""The queen's view of the cluster: hives and workers from heartbeats, their health, the
operators' drains, and the view operators read.

Pure logic: no sockets, no sleeping; time comes from an injected clock and
events go to a callback the I/O layer wires to the event bus.

Heartbeats are the truth about which workers exist and in what state. Slots and picks are the
router's (queen/routing/router.py): it is told of every change here through `watcher`, and
keeps its own indexes from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from apiary.clock import Clock
from apiary.protoutil import READY_STATES, timestamp
from apiary.serving import MAX_RECONNECT_BACKOFF_MS
from protos.v1 import common_pb2, queen_pb2
from queen.beats import host_of, same_host
from queen.members import HiveEntry, Unwatched, Watcher, WorkerEntry, live_state

DEGRADED_AFTER_INTERVALS = 2
# After (re)starting, the queen waits this many heartbeat intervals for hives (plus the longest
# reconnect backoff of their channels) before it calls a model unknown: a request during that
# time waits instead of getting a false NOT_FOUND.
WARMUP_INTERVALS = 2
WARMUP_RECONNECT = MAX_RECONNECT_BACKOFF_MS / 1000
UNHEALTHY_AFTER_INTERVALS = 3


@dataclass
class RegistrySettings:
    interval: float = 1.0
    # An unhealthy hive (and its workers) is forgotten after this many intervals of silence.
    hive_ttl_intervals: float = 10.0


@dataclass
class BeatResult:
    """What applying a hive's report did: channels to close, records not applied and why."""

    removed: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


class HiveTaken(Exception):
    """Another running hive process heartbeats under this id."""


class Registry:
    def __init__(
        self,
        clock: Clock,
        settings: RegistrySettings | None = None,
        on_event: Callable[[queen_pb2.Event], None] = lambda event: None,
    ) -> None:
        # Called with every cluster event the registry sees (hives, workers, drains, health).
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
        # The router, once one is built on this registry.
        self.watcher: Watcher = Unwatched()

    @property
    def interval(self) -> float:
        return self.settings.interval

    # ---- events -----------------------------------------------------------

    def _event(self, kind: queen_pb2.EventKind.ValueType, **fields: object) -> None:
        self.on_event(queen_pb2.Event(kind=kind, time=timestamp(self.clock.time()), **fields))  # type: ignore[arg-type]

    def _worker_event(
        self, kind: queen_pb2.EventKind.ValueType, record: common_pb2.WorkerRecord, **fields: object
    ) -> None:
        self._event(kind, hive_id=record.hive_id, worker_id=record.id, model=record.model, **fields)

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
        for sample in samples:
            entry = self.workers.get(sample.id)
            if entry is not None and entry.record.hive_id == hive.id:
                entry.sample = sample
                self.watcher.sampled(entry, sample)

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
        if was == common_pb2.HIVE_HEALTH_UNHEALTHY and self.note_health(hive) != was:
            # Picks dropped its workers from the indexes while it was silent; an unchanged
            # table re-adds nothing by itself, so put them back now.
            for worker_id in hive.worker_ids:
                self.watcher.changed(self.workers[worker_id])
        else:
            self.note_health(hive)
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
                self.watcher.changed(entry)

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
        model_ids = self._by_model.get(entry.model, set())
        model_ids.discard(worker_id)
        if not model_ids:
            self._by_model.pop(entry.model, None)
        self.watcher.removed(entry, last_of_model=not model_ids)
        self._worker_event(queen_pb2.EVENT_KIND_WORKER_REMOVED, entry.record)
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
            entry = WorkerEntry(record, drained=record.id in self.drained_workers)
            self.workers[record.id] = entry
            self._by_model.setdefault(record.model, set()).add(record.id)
            self._worker_event(queen_pb2.EVENT_KIND_WORKER_JOINED, record, state=record.state)
        else:
            if entry.record.address != record.address:
                # A new process behind the same id (restarted, or gone): slots on the old one
                # can no longer be given back to it, so its slots start over.
                removed.append(entry.record.address)
                entry.in_flight = 0
            if entry.record.state != record.state:
                self._worker_event(
                    queen_pb2.EVENT_KIND_WORKER_STATE_CHANGED, record, state=record.state,
                    previous_state=entry.record.state,
                )  # fmt: skip
            entry.renew(record)
            entry.unreachable = False
        hive.worker_ids.add(record.id)
        self.watcher.changed(entry)
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
        age, interval = self.clock.monotonic() - hive.last_seen, self.settings.interval
        if age >= UNHEALTHY_AFTER_INTERVALS * interval:
            return common_pb2.HIVE_HEALTH_UNHEALTHY
        if age >= DEGRADED_AFTER_INTERVALS * interval:
            return common_pb2.HIVE_HEALTH_DEGRADED
        return common_pb2.HIVE_HEALTH_HEALTHY

    def hive_health(self, hive: HiveEntry) -> tuple[common_pb2.HiveHealth.ValueType, str]:
        """The hive's health and, unless healthy, why: for operators."""
        health = self.health_of(hive)
        if health == common_pb2.HIVE_HEALTH_HEALTHY:
            return health, ""
        word, after, so = (
            ("unhealthy", UNHEALTHY_AFTER_INTERVALS, "not routed to")
            if health == common_pb2.HIVE_HEALTH_UNHEALTHY
            else ("degraded", DEGRADED_AFTER_INTERVALS, "routed to last")
        )
        return health, (
            f"no heartbeat for {self.heartbeat_age(hive):.1f}s ({word} after {after} "
            f"intervals of {self.settings.interval:g}s; {so})"
        )

    def note_health(self, hive: HiveEntry) -> common_pb2.HiveHealth.ValueType:
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
        """Periodic: health transitions and hives past their TTL.

        Returns the addresses of removed workers.
        """
        removed: list[str] = []
        ttl = self.settings.hive_ttl_intervals * self.settings.interval
        for hive in list(self.hives.values()):
            self.note_health(hive)
            if self.heartbeat_age(hive) >= ttl:
                removed += self.remove_hive(hive.id, f"no heartbeat for {ttl:g}s (TTL)")
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
                self.watcher.changed(self.workers[worker_id])

    def drain_worker(self, worker_id: str, drained: bool) -> None:
        (self.drained_workers.add if drained else self.drained_workers.discard)(worker_id)
        entry = self.workers.get(worker_id)
        if entry is not None and entry.drained != drained:
            entry.drained = drained
            drain = queen_pb2.EVENT_KIND_WORKER_DRAINED
            self._worker_event(
                drain if drained else queen_pb2.EVENT_KIND_WORKER_UNDRAINED, entry.record
            )
            self.watcher.changed(entry)

    def is_drained(self, entry: WorkerEntry) -> bool:
        hive = self.hives.get(entry.hive_id)
        return entry.drained or (hive is not None and hive.drained)

    def mark_unreachable(self, worker_id: str) -> None:
        """Stop routing to a worker we failed to reach until its hive vouches for it again."""
        entry = self.workers.get(worker_id)
        if entry is not None:
            entry.unreachable = True
            self._unreachable.add(worker_id)
            self.watcher.changed(entry)

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

    def workers_of_model(self, model: str) -> Iterator[WorkerEntry]:
        for worker_id in self._by_model.get(model, ()):
            yield self.workers[worker_id]

    def workers_of_hive(self, hive_id: str) -> Iterator[WorkerEntry]:
        hive = self.hives.get(hive_id)
        for worker_id in hive.worker_ids if hive else ():
            yield self.workers[worker_id]

    def view(self, entry: WorkerEntry, score: float = 0.0) -> common_pb2.WorkerRecord:
        """The record as operators see it: the hive's report, the queen's knowledge, a score."""
        out = common_pb2.WorkerRecord()
        out.CopyFrom(entry.record)
        if out.state in READY_STATES:
            out.state = live_state(entry)
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
        out.stats.CopyFrom(
            common_pb2.WorkerStats(
                mean_duration_seconds=stats.mean_duration,
                p50_duration_seconds=stats.p50_duration,
                tokens_per_second=stats.speed or 0.0,
                success_rate=stats.success_rate,
                consecutive_failures=stats.consecutive_failures,
                score=score,
            )
        )
        return out
