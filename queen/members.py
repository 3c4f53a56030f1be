"""What the queen knows of each hive and worker: the registry's rows, which the router reads and
keys its indexes on, and the one place a ready worker's live state (idle or busy by the queen's
own slot count) is worked out.

Pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from apiary.protoutil import READY_STATES
from protos.v1 import common_pb2, queen_pb2
from queen.stats import WorkerStatsTracker


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
        """The hive's newer record of this worker. What it serves counts as one of its tags
        (task=generate, task=embed), so a request is only ever routed to a worker of its kind."""
        self.record, self.address = record, record.address
        self.tags = frozenset(record.tags) | {task_tag(record.task)}

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


def live_state(entry: WorkerEntry) -> common_pb2.WorkerState.ValueType:
    """The worker's state as operators see it: a ready worker is BUSY while the queen has one of
    its slots out, else IDLE (the hive's word on it can be an interval old)."""
    state = entry.record.state
    if state in READY_STATES:
        return common_pb2.WORKER_STATE_BUSY if entry.in_flight else common_pb2.WORKER_STATE_IDLE
    return state


class Watcher(Protocol):
    """Who keeps indexes over the workers (the router): told of every change to a worker that
    routing reads, so a pick never scans the fleet."""

    def changed(self, entry: WorkerEntry) -> None: ...

    def removed(self, entry: WorkerEntry, last_of_model: bool) -> None: ...

    def sampled(self, entry: WorkerEntry, sample: common_pb2.WorkerSample) -> None: ...


class Unwatched:
    """No indexes (a registry on its own, e.g. in a test of membership)."""

    def changed(self, entry: WorkerEntry) -> None:
        pass

    def removed(self, entry: WorkerEntry, last_of_model: bool) -> None:
        pass

    def sampled(self, entry: WorkerEntry, sample: common_pb2.WorkerSample) -> None:
        pass


GENERATE_TAG, EMBED_TAG = "task=generate", "task=embed"


def task_tag(task: common_pb2.WorkerTask.ValueType) -> str:
    """The tag of a worker's task (a worker that does not say generates)."""
    return EMBED_TAG if task == common_pb2.WORKER_TASK_EMBED else GENERATE_TAG
