"""The queen's view of the cluster: hives and workers from heartbeats, and slot leases.

Pure logic: no sockets, no sleeping; time comes from an injected clock.

Heartbeats are the truth about which workers exist and in what state; the
queen's own leases are the truth about slots in use (a heartbeat can be up to
an interval old, so it never overwrites them). A per-model index of workers
with a free slot, ordered least recently used first, makes a pick O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from apiary.clock import Clock
from protos.v1 import common_pb2, queen_pb2

S = common_pb2
READY_STATES = frozenset({S.WORKER_STATE_IDLE, S.WORKER_STATE_BUSY})
UNHEALTHY_AFTER_INTERVALS = 3


@dataclass
class HiveEntry:
    id: str
    address: str
    first_seen_wall: float
    last_seen: float
    resources: queen_pb2.HiveResources = field(default_factory=queen_pb2.HiveResources)
    stats: queen_pb2.HiveStats = field(default_factory=queen_pb2.HiveStats)
    worker_ids: set[str] = field(default_factory=set)


@dataclass
class WorkerEntry:
    record: common_pb2.WorkerRecord
    # Slots the queen has leased out on this worker right now.
    in_flight: int = 0
    # Set when the queen could not reach the worker; cleared by the next
    # heartbeat that reports the worker (the hive would have reported its exit).
    unreachable: bool = False
    completed: int = 0
    failed: int = 0

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def free_slots(self) -> int:
        return max(self.record.slots_total - self.in_flight, 0)

    def routable(self) -> bool:
        return self.record.state in READY_STATES and not self.unreachable and self.free_slots > 0

    def view(self) -> common_pb2.WorkerRecord:
        """The record as operators see it: the hive's report with the queen's slot counts."""
        out = common_pb2.WorkerRecord()
        out.CopyFrom(self.record)
        if out.state in READY_STATES:
            out.state = S.WORKER_STATE_BUSY if self.in_flight else S.WORKER_STATE_IDLE
            out.slots_available = self.free_slots
        out.requests_completed = self.completed
        out.requests_failed = self.failed
        if self.unreachable and not out.failure_reason:
            out.failure_reason = "queen could not reach the worker"
        return out


@dataclass(frozen=True)
class Lease:
    """One slot on one worker, held by one request."""

    worker_id: str
    hive_id: str
    address: str
    model: str


@dataclass
class HeartbeatOutcome:
    # Addresses of workers that are gone, so their channels can be closed.
    removed_addresses: list[str] = field(default_factory=list)
    new_hive: bool = False


class Registry:
    def __init__(self, clock: Clock, interval: float = 1.0) -> None:
        self.clock = clock
        self.interval = interval
        self.hives: dict[str, HiveEntry] = {}
        self.workers: dict[str, WorkerEntry] = {}
        # model -> worker ids (all states), and model -> routable ids in LRU order.
        self._by_model: dict[str, set[str]] = {}
        self._free: dict[str, OrderedDict[str, None]] = {}

    # ---- heartbeats -------------------------------------------------------

    def apply_heartbeat(self, beat: queen_pb2.HiveHeartbeat) -> HeartbeatOutcome:
        """Replace everything known about the hive with its heartbeat; stamp it with our clock."""
        outcome = HeartbeatOutcome()
        if beat.leaving:
            outcome.removed_addresses = self.remove_hive(beat.hive_id)
            return outcome
        now = self.clock.monotonic()
        hive = self.hives.get(beat.hive_id)
        if hive is None:
            hive = HiveEntry(beat.hive_id, beat.address, self.clock.time(), now)
            self.hives[beat.hive_id] = hive
            outcome.new_hive = True
        hive.address = beat.address
        hive.last_seen = now
        hive.resources = beat.resources
        hive.stats = beat.stats

        reported = {record.id: record for record in beat.workers}
        for gone in hive.worker_ids - reported.keys():
            outcome.removed_addresses.append(self.forget_worker(gone))
        for record in reported.values():
            self._upsert(hive, record, outcome)
        return outcome

    def apply_worker(self, record: common_pb2.WorkerRecord) -> HeartbeatOutcome:
        """One worker's fresh record from its hive (e.g. a spawn reply), ahead of the heartbeat."""
        outcome = HeartbeatOutcome()
        hive = self.hives.get(record.hive_id)
        if hive is not None:
            self._upsert(hive, record, outcome)
        return outcome

    def forget_worker(self, worker_id: str) -> str:
        """Drop a worker its hive has confirmed stopped; returns its address."""
        entry = self.workers.get(worker_id)
        if entry is None:
            return ""
        hive = self.hives.get(entry.record.hive_id)
        if hive is not None:
            hive.worker_ids.discard(worker_id)
        return self._remove_worker(worker_id)

    def _upsert(
        self, hive: HiveEntry, record: common_pb2.WorkerRecord, outcome: HeartbeatOutcome
    ) -> None:
        entry = self.workers.get(record.id)
        if entry is None or entry.record.hive_id != hive.id:
            if entry is not None:  # the worker moved hives (should not happen); start over
                self.forget_worker(record.id)
            entry = WorkerEntry(record)
            self.workers[record.id] = entry
            self._by_model.setdefault(record.model, set()).add(record.id)
        else:
            if entry.record.model != record.model:
                self._unindex(entry)
                self._by_model[entry.record.model].discard(record.id)
                self._by_model.setdefault(record.model, set()).add(record.id)
            if entry.record.address != record.address:
                # A new process behind the same id (restarted, or gone): leases on the old one
                # can no longer be released against it, so its slots start over.
                if entry.record.address:
                    outcome.removed_addresses.append(entry.record.address)
                entry.in_flight = 0
            entry.record = record
            entry.unreachable = False
        hive.worker_ids.add(record.id)
        self._reindex(entry)

    def remove_hive(self, hive_id: str) -> list[str]:
        hive = self.hives.pop(hive_id, None)
        if hive is None:
            return []
        return [self._remove_worker(wid) for wid in hive.worker_ids]

    def _remove_worker(self, worker_id: str) -> str:
        entry = self.workers.pop(worker_id, None)
        if entry is None:
            return ""
        self._unindex(entry)
        model_ids = self._by_model.get(entry.record.model)
        if model_ids is not None:
            model_ids.discard(worker_id)
            if not model_ids:
                del self._by_model[entry.record.model]
        return entry.record.address

    # ---- health -----------------------------------------------------------

    def heartbeat_age(self, hive: HiveEntry) -> float:
        return max(self.clock.monotonic() - hive.last_seen, 0.0)

    def hive_health(self, hive: HiveEntry) -> tuple[queen_pb2.HiveHealth.ValueType, str]:
        age = self.heartbeat_age(hive)
        limit = UNHEALTHY_AFTER_INTERVALS * self.interval
        if age >= limit:
            return (
                queen_pb2.HIVE_HEALTH_UNHEALTHY,
                f"no heartbeat for {age:.1f}s (limit {limit:.1f}s = "
                f"{UNHEALTHY_AFTER_INTERVALS} intervals of {self.interval:g}s)",
            )
        return queen_pb2.HIVE_HEALTH_HEALTHY, ""

    def hive_healthy(self, hive_id: str) -> bool:
        hive = self.hives.get(hive_id)
        return hive is not None and self.hive_health(hive)[0] == queen_pb2.HIVE_HEALTH_HEALTHY

    # ---- leases -----------------------------------------------------------

    def acquire(self, model: str, exclude: Iterable[str] = ()) -> Lease | None:
        """Take a slot on the least recently used routable worker of `model`, or None.

        `exclude` holds worker addresses already tried for this request.
        """
        index = self._free.get(model)
        if not index:
            return None
        excluded = set(exclude)
        parked: list[str] = []
        chosen: WorkerEntry | None = None
        for worker_id in index:
            entry = self.workers[worker_id]
            if not self.hive_healthy(entry.record.hive_id):
                # Out of the index until the hive's next heartbeat re-adds it.
                parked.append(worker_id)
                continue
            if entry.record.address in excluded:
                continue
            chosen = entry
            break
        for worker_id in parked:
            del index[worker_id]
        if chosen is None:
            return None
        chosen.in_flight += 1
        self._reindex(chosen)
        return Lease(chosen.id, chosen.record.hive_id, chosen.record.address, model)

    def release(self, lease: Lease, ok: bool | None) -> None:
        """Give the slot back and count the outcome (None: the slot went unused).

        A lease on a worker that has since gone is simply dropped.
        """
        entry = self.workers.get(lease.worker_id)
        if entry is None or entry.record.address != lease.address:
            return
        entry.in_flight = max(entry.in_flight - 1, 0)
        if ok is True:
            entry.completed += 1
        elif ok is False:
            entry.failed += 1
        self._reindex(entry)

    def mark_unreachable(self, worker_id: str) -> None:
        """Stop routing to a worker we failed to reach until its hive vouches for it again."""
        entry = self.workers.get(worker_id)
        if entry is not None:
            entry.unreachable = True
            self._unindex(entry)

    def _reindex(self, entry: WorkerEntry) -> None:
        """Put the worker at the most-recently-used end of its model's index, or take it out."""
        if entry.routable():
            index = self._free.setdefault(entry.record.model, OrderedDict())
            index[entry.id] = None
            index.move_to_end(entry.id)
        else:
            self._unindex(entry)

    def _unindex(self, entry: WorkerEntry) -> None:
        index = self._free.get(entry.record.model)
        if index is not None:
            index.pop(entry.id, None)
            if not index:
                del self._free[entry.record.model]

    # ---- queries ----------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(self._by_model)

    def has_model(self, model: str) -> bool:
        return model in self._by_model

    def workers_of_model(self, model: str) -> Iterator[WorkerEntry]:
        for worker_id in self._by_model.get(model, ()):
            yield self.workers[worker_id]

    def workers_of_hive(self, hive_id: str) -> Iterator[WorkerEntry]:
        hive = self.hives.get(hive_id)
        for worker_id in hive.worker_ids if hive else ():
            yield self.workers[worker_id]
