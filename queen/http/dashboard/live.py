"""The dashboard's live side: the sampler that closes the series' intervals, and the
server-sent event streams that carry the queen's events and each new point to open pages.

Every stream is one EventBus subscription with a bounded backlog (a page that falls behind
loses events, told how many, never memory), there are at most MAX_STREAMS of them, and a
stream's subscription ends with its connection (see routes.py) or when the queen stops.
Events are sent in batches at most BATCH_PAUSE apart: a busy cluster's request events
arrive by the thousand per second, and a browser needs a few updates a second.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import structlog

from apiary.clock import Clock
from queen.events import EventBus, Subscriber
from queen.http.dashboard.forms import to_json
from queen.http.dashboard.series import Point, Series
from queen.routing.desk import Desk

log = structlog.get_logger("queen.http.dashboard")

MAX_STREAMS = 16
MAX_BATCH = 200
BATCH_PAUSE = 0.25
# A comment line this often keeps proxies and the browser from closing an idle stream.
KEEPALIVE = 15.0
# How often the sampler looks at the queue (an interval reports the deepest it saw).
QUEUE_LOOK = 1.0


def message(kind: str, data: Any) -> bytes:
    """One server-sent event: `event: KIND` and its JSON on one data line."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Stream:
    """One open page's stream: its subscription, and the points it has not been sent."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self.points: deque[Point] = deque(maxlen=16)
        self.ending = False

    def wake(self) -> None:
        self.subscriber.wake.set()

    def batch(self) -> list[bytes]:
        """What is waiting, as messages: dropped events said first, at most MAX_BATCH
        events (the newest: the subscriber keeps no more and counts the others dropped),
        then new points."""
        pending = self.subscriber.pending
        dropped, self.subscriber.dropped = self.subscriber.dropped, 0
        out = []
        if pending or dropped:
            events = [to_json(pending.popleft()) for _ in range(len(pending))]
            out.append(message("events", {"events": events, "dropped": dropped}))
        while self.points:
            out.append(message("point", self.points.popleft().as_json()))
        return out

    async def messages(self) -> AsyncIterator[bytes]:
        """Messages until the queen stops (`bye`); a comment when idle for KEEPALIVE."""
        wake = self.subscriber.wake
        yield b"retry: 2000\n\n"
        while not self.ending:
            try:
                await asyncio.wait_for(wake.wait(), KEEPALIVE)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            wake.clear()
            for chunk in self.batch():
                yield chunk
            await asyncio.sleep(BATCH_PAUSE)
        for chunk in self.batch():
            yield chunk
        yield message("bye", {"reason": "the queen is stopping"})


class Live:
    """The sampler task and the open streams."""

    def __init__(
        self, series: Series, events: EventBus, desk: Desk, clock: Clock,
        max_streams: int = MAX_STREAMS,
    ) -> None:  # fmt: skip
        self.series, self.events, self.desk, self.clock = series, events, desk, clock
        self.max_streams = max_streams
        self.streams: set[Stream] = set()
        self.sampler: asyncio.Task[None] | None = None

    def open(self) -> Stream | None:
        """A new stream, or None when MAX_STREAMS are open."""
        if len(self.streams) >= self.max_streams:
            return None
        stream = Stream(self.events.subscribe(backlog=MAX_BATCH))
        self.streams.add(stream)
        return stream

    def close(self, stream: Stream) -> None:
        """The page went away: its subscription ends now."""
        self.events.unsubscribe(stream.subscriber)
        self.streams.discard(stream)

    def start(self) -> None:
        if self.sampler is None:
            self.sampler = asyncio.get_running_loop().create_task(
                self.sample_forever(), name="dashboard-sampler"
            )

    def stop(self) -> None:
        """The queen is stopping: the sampler ends, and each stream says `bye` and ends."""
        if self.sampler is not None:
            self.sampler.cancel()
        for stream in list(self.streams):
            stream.ending = True
            stream.wake()

    async def sample_forever(self) -> None:
        """Look at the queue every QUEUE_LOOK seconds, close an interval every interval."""
        started = self.clock.monotonic()
        while True:
            await self.clock.sleep(QUEUE_LOOK)
            try:
                started = self.step(started)
            except Exception:
                log.exception("dashboard sample failed")  # the loop must not die silently

    def step(self, started: float) -> float:
        """One look; returns when the current interval started."""
        self.series.queue_seen(self.desk.queued)
        now = self.clock.monotonic()
        if now - started < self.series.interval - QUEUE_LOOK / 2:
            return started
        point = self.series.close(self.clock.time(), now - started)
        for stream in self.streams:
            stream.points.append(point)
            stream.wake()
        return now
