"""The queen's shared state, and the follow-ups that must happen together when it changes.

Every service gets one `Cluster`. A worker table from a heartbeat, a spawn
reply or an autospawn goes in through it, so the channels of workers that are
gone get closed and waiting requests get the new slots, every time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from apiary.clock import Clock
from apiary.protoutil import enum_name
from apiary.validation import DEFAULT_MAX_TOKENS
from protos.v1 import common_pb2, queen_pb2
from queen.autospawn import Autospawner
from queen.channels import Channels
from queen.events import EventBus
from queen.history import History
from queen.leases.manager import LeaseManager
from queen.metrics import QueenMetrics
from queen.registry import BeatResult, Registry
from queen.routing.desk import Desk
from queen.routing.router import Router
from queen.served import model_problem

log = structlog.get_logger("queen")

# Logged as well as published: what an operator reading the queen's log wants to see.
LOGGED_EVENTS = frozenset(
    {
        queen_pb2.EVENT_KIND_HIVE_JOINED,
        queen_pb2.EVENT_KIND_HIVE_HEALTH_CHANGED,
        queen_pb2.EVENT_KIND_HIVE_REMOVED,
        queen_pb2.EVENT_KIND_WORKER_CIRCUIT_OPENED,
        queen_pb2.EVENT_KIND_WORKER_CIRCUIT_CLOSED,
        queen_pb2.EVENT_KIND_HIVE_DRAINED,
        queen_pb2.EVENT_KIND_HIVE_UNDRAINED,
    }
)


class HiveLost(Exception):
    """The worker's hive went unhealthy while we waited for the first chunk."""


class HiveWatch:
    """Lets requests waiting on a worker hear that its hive was lost."""

    def __init__(self) -> None:
        self._waiting: dict[str, dict[int, Callable[[], None]]] = {}
        self._next = 0

    def watch(self, hive_id: str, on_lost: Callable[[], None]) -> int:
        self._next += 1
        self._waiting.setdefault(hive_id, {})[self._next] = on_lost
        return self._next

    def unwatch(self, hive_id: str, key: int) -> None:
        waiting = self._waiting.get(hive_id)
        if waiting is not None:
            waiting.pop(key, None)
            if not waiting:
                del self._waiting[hive_id]

    def lost(self, hive_id: str) -> None:
        for on_lost in self._waiting.pop(hive_id, {}).values():
            on_lost()

    async def first(
        self, hive_id: str, worker_id: str, call: Any, read: Callable[[Any], Awaitable[object]]
    ) -> object:
        """A worker call's first chunk (or EOF) as `read` gets it; HiveLost if the worker's
        hive goes unhealthy first.

        A worker cut off with its hive (a network partition) sends no error, just nothing;
        waiting for TCP or keepalive to say so would stall the request for many seconds, while
        the queen knows within 3 heartbeat intervals. Nothing has reached the client yet, so
        the request can safely move to another worker.
        """
        lost = False

        def on_lost() -> None:
            nonlocal lost
            lost = True
            call.cancel()  # wakes the read below with CancelledError

        key = self.watch(hive_id, on_lost)
        try:
            return await read(call)
        except asyncio.CancelledError:
            if not lost:
                raise  # the request itself was cancelled
            raise HiveLost(
                f"hive {hive_id} of worker {worker_id} stopped heartbeating before the first chunk"
            ) from None
        finally:
            self.unwatch(hive_id, key)


def hive_lost(event: queen_pb2.Event) -> bool:
    """Requests on the hive's workers may be cut off: it is gone or has gone silent."""
    return event.kind == queen_pb2.EVENT_KIND_HIVE_REMOVED or (
        event.kind == queen_pb2.EVENT_KIND_HIVE_HEALTH_CHANGED
        and event.health == common_pb2.HIVE_HEALTH_UNHEALTHY
    )


def log_event(event: queen_pb2.Event) -> None:
    """'hive health changed', 'worker circuit opened': the kind as words."""
    words = enum_name(queen_pb2.EventKind, event.kind, "EVENT_KIND_").lower()
    log.info(
        words.replace("_", " "),
        hive_id=event.hive_id,
        worker_id=event.worker_id,
        detail=event.detail,
    )


@dataclass
class Cluster:
    """What the queen's services share. Building one connects its parts' callbacks to it."""

    registry: Registry
    router: Router
    desk: Desk
    channels: Channels
    events: EventBus
    history: History
    autospawn: Autospawner
    leases: LeaseManager
    clock: Clock
    max_tokens_cap: int
    max_prompt_bytes: int
    max_streams_per_client: int
    metrics: QueenMetrics
    # How many times a request may move mid-stream to another worker.
    migration_limit: int
    hive_watch: HiveWatch = field(default_factory=HiveWatch)
    # What a request without max_tokens gets.
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    # Refused records already logged, so a repeating table is not logged every interval.
    _refusals_told: set[tuple[str, str, str]] = field(default_factory=set)
    # Require a hive's id to be a name in its client certificate (mTLS).
    hive_identity_from_cert: bool = False

    def __post_init__(self) -> None:
        # The parts report here; the follow-ups that cross parts happen in this class only.
        registry, desk = self.registry, self.desk
        registry.on_event = self.router.on_event = self.on_event
        # A pick that finds a hive's health changed has the registry say so (picks say nothing).
        self.router.on_health = registry.note_health
        self.channels.worker_at = registry.worker_at
        desk.expecting = self.expecting
        desk.explain = lambda model: model_problem(registry, self.autospawn, model)
        desk.on_waited = lambda model, seconds: self.metrics.queue_wait.labels(model).observe(
            seconds
        )
        self.autospawn.on_spawned = self.autospawned
        self.autospawn.on_failure = desk.fail

    def status(self) -> queen_pb2.QueenStatus:
        """The queen's own status: its history's health and its request totals."""
        return self.metrics.status(self.history.status())

    # ---- changes to the worker table ---------------------------------------

    def apply_heartbeat(
        self,
        beat: queen_pb2.HiveHeartbeat,
        changed: Sequence[common_pb2.WorkerRecord] | None = None,
        host_names: frozenset[str] = frozenset(),
    ) -> None:
        """A hive's whole table: replaces what we knew; waiting requests get any free slot.

        Raises HiveTaken if another running hive process has the id."""
        result = self.registry.apply_heartbeat(beat, changed, host_names)
        self._follow_up(beat.hive_id, result)
        self.desk.dispatch_all()

    def apply_worker(self, record: common_pb2.WorkerRecord) -> None:
        """One worker's fresh record from its hive's reply, as good as a heartbeat's."""
        self._follow_up(record.hive_id, self.registry.apply_worker(record))
        self.desk.dispatch(record.model)

    def _follow_up(self, hive_id: str, result: BeatResult) -> None:
        self.channels.discard_all(result.removed)
        for worker_id, reason in result.refused:
            if (hive_id, worker_id, reason) in self._refusals_told:
                continue  # said once; a hive repeats its table every interval
            if len(self._refusals_told) > 10_000:
                self._refusals_told.clear()  # bounded: a hostile hive may invent ids
            self._refusals_told.add((hive_id, worker_id, reason))
            log.warning("worker record refused", hive_id=hive_id, worker_id=worker_id, why=reason)
            self.events.emit(
                queen_pb2.EVENT_KIND_WORKER_RECORD_REFUSED,
                self.clock.time(),
                hive_id=hive_id,
                worker_id=worker_id,
                detail=reason,
            )

    def autospawned(self, record: common_pb2.WorkerRecord) -> None:
        self.apply_worker(record)
        self.events.emit(
            queen_pb2.EVENT_KIND_AUTOSPAWN,
            self.clock.time(),
            worker_id=record.id,
            hive_id=record.hive_id,
            model=record.model,
        )

    def expecting(self, model: str) -> bool:
        """A worker of `model` may yet come: requests for it keep waiting instead of failing."""
        return self.registry.warming_up() or self.autospawn.expecting(model)

    # ---- events -------------------------------------------------------------

    def on_event(self, event: queen_pb2.Event) -> None:
        """Every registry and router event: wakes requests on a lost hive, logs some, publishes
        all."""
        if hive_lost(event):
            self.hive_watch.lost(event.hive_id)
        if event.kind in LOGGED_EVENTS:
            log_event(event)
        self.events.publish([event])

    # ---- the sweep ------------------------------------------------------------

    def sweep(self) -> None:
        """Health transitions, TTL removals and circuit breakers, then hand out freed slots."""
        self.channels.discard_all(self.registry.sweep())
        self.router.sweep()
        self.desk.dispatch_all()

    async def sweep_forever(self) -> None:
        """Sweep every half heartbeat interval, on the cluster's clock."""
        while True:
            await self.clock.sleep(self.registry.interval / 2)
            try:
                self.sweep()
            except Exception:
                # The sweep must never die silently: log and keep going.
                log.exception("sweep step failed")

    async def close(self) -> None:
        await self.leases.close()
        await self.autospawn.close()
        await self.channels.close()
        await self.history.close()
