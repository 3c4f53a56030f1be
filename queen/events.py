"""Cluster events to WatchEvents subscribers; a slow subscriber loses events, not memory."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable

from apiary.protoutil import timestamp
from protos.v1 import queen_pb2

BACKLOG = 10_000


class Subscriber:
    def __init__(self, kinds: Iterable[queen_pb2.EventKind.ValueType], backlog: int) -> None:
        self.kinds = frozenset(kinds)
        self.pending: deque[queen_pb2.Event] = deque(maxlen=backlog)
        self.dropped = 0
        self.wake = asyncio.Event()

    def offer(self, event: queen_pb2.Event) -> None:
        if self.kinds and event.kind not in self.kinds:
            return
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1
        self.pending.append(event)
        self.wake.set()

    async def __aiter__(self) -> AsyncIterator[queen_pb2.Event]:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                yield queen_pb2.Event(
                    kind=queen_pb2.EVENT_KIND_EVENTS_DROPPED,
                    detail=f"{dropped} event(s) dropped: this watcher fell behind",
                )
            while self.pending:
                yield self.pending.popleft()


class EventBus:
    def __init__(self, backlog: int = BACKLOG) -> None:
        self.backlog = backlog
        self._subscribers: set[Subscriber] = set()

    @property
    def watched(self) -> bool:
        return bool(self._subscribers)

    def publish(self, events: Iterable[queen_pb2.Event]) -> None:
        for event in events:
            for sub in self._subscribers:
                sub.offer(event)

    def emit(self, kind: queen_pb2.EventKind.ValueType, now: float, **fields: object) -> None:
        """Build and publish one event, only if someone is watching (requests are the hot path)."""
        if self._subscribers:
            self.publish([queen_pb2.Event(kind=kind, time=timestamp(now), **fields)])  # type: ignore[arg-type]

    def subscribe(
        self, kinds: Iterable[queen_pb2.EventKind.ValueType] = (), backlog: int | None = None
    ) -> Subscriber:
        """A new subscriber; `backlog` (default the bus's) bounds what it holds unread."""
        sub = Subscriber(kinds, backlog or self.backlog)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
