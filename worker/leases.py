"""The worker's side of direct leases: it checks lease tokens itself, and tells the queen, on
the queen's one lease stream (Worker.Leases), when a leased call starts and ends.

The queen's notices on that stream carry its clock (a lease expires on the queen's clock, so
the machines' clocks need not agree), the leases it handed out on this worker (their slots
are held here too) and those given back. Reports made while no queen stream is open wait,
a bounded number, for the next one: the queen opens its stream at its first lease on this
worker, and a client may be quicker.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog

from apiary.clock import Clock
from apiary.errors import StatusError
from apiary.leasetoken import LeaseToken, lease_key, verify
from apiary.serving import Context
from protos.v1 import worker_pb2
from worker.slots import Slots

log = structlog.get_logger("worker.leases")

# Reports kept while no queen stream is open (the oldest go first beyond it).
MAX_BACKLOG = 4096
# A queen clock further than this from ours is a mistake, not a skew.
MAX_CLOCK_OFFSET = 86_400.0


@dataclass(eq=False)
class _Outbox:
    """Reports on their way out on one queen stream."""

    events: list[worker_pb2.LeaseEvent] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once the queen's side of the stream has ended (or failed: `error`).
    closed: bool = False
    error: BaseException | None = None


class LeaseDesk:
    """Lease tokens checked against this worker's key; lease starts and ends reported."""

    def __init__(self, worker_id: str, worker_token: str, slots: Slots, clock: Clock) -> None:
        self.key = lease_key(worker_token, worker_id)
        self.slots = slots
        self.clock = clock
        # The queen's clock minus ours, as its last notice said.
        self.offset = 0.0
        self._outboxes: dict[int, _Outbox] = {}
        self._backlog: deque[worker_pb2.LeaseEvent] = deque(maxlen=MAX_BACKLOG)
        self._streams = 0

    def now(self) -> float:
        """The queen's wall clock, as far as we know it."""
        return self.clock.time() + self.offset

    def read(self, token: str) -> LeaseToken | None:
        """The lease a token names if it was signed for this worker; else None."""
        return verify(self.key, token)

    def started(self, lease_id: str) -> None:
        self._report(worker_pb2.LeaseEvent(lease_id=lease_id, state=worker_pb2.LEASE_STATE_IN_USE))

    def ended(self, lease_id: str, ok: bool, completion_tokens: int) -> None:
        self._report(
            worker_pb2.LeaseEvent(
                lease_id=lease_id, state=worker_pb2.LEASE_STATE_DONE, ok=ok,
                completion_tokens=completion_tokens,
            )
        )  # fmt: skip

    def _report(self, event: worker_pb2.LeaseEvent) -> None:
        if not self._outboxes:
            self._backlog.append(event)
            return
        for outbox in self._outboxes.values():
            outbox.events.append(event)
            outbox.ready.set()

    async def serve(
        self, notices: AsyncIterator[worker_pb2.LeaseNotice], context: Context
    ) -> AsyncIterator[worker_pb2.LeaseReport]:
        """One queen lease stream: its notices applied as they come, our reports sent as
        they happen. Ends when the queen ends its side; the slots it held are free then."""
        self._streams += 1
        stream = self._streams
        outbox = self._outboxes[stream] = _Outbox(events=list(self._backlog))
        self._backlog.clear()
        outbox.ready.set()
        reader = asyncio.get_running_loop().create_task(self._read(notices, stream, outbox))
        try:
            while True:
                await outbox.ready.wait()
                outbox.ready.clear()
                if outbox.events:
                    events, outbox.events = outbox.events, []
                    yield worker_pb2.LeaseReport(events=events)
                if outbox.closed:
                    break
            if outbox.error is not None:
                raise outbox.error
        finally:
            reader.cancel()
            del self._outboxes[stream]
            dropped = self.slots.drop_holds(stream)
            if dropped:
                log.info("queen lease stream ended; its held slots are free", released=dropped)

    async def _read(
        self,
        notices: AsyncIterator[worker_pb2.LeaseNotice],
        stream: int,
        outbox: _Outbox,
    ) -> None:
        try:
            async for notice in notices:
                self.apply(notice, stream)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            outbox.error = exc
        finally:
            outbox.closed = True
            outbox.ready.set()

    def apply(self, notice: worker_pb2.LeaseNotice, stream: int) -> None:
        """A queen notice: its clock, the leases it handed out here, those given back.
        Tokens not signed for this worker are ignored (they hold nothing)."""
        if notice.queen_time:
            offset = notice.queen_time - self.clock.time()
            if not (math.isfinite(offset) and abs(offset) <= MAX_CLOCK_OFFSET):
                raise StatusError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"queen_time {notice.queen_time!r} is not a plausible clock",
                )
            self.offset = offset
        now = self.now()
        for token in notice.revoked:
            lease = self.read(token)
            if lease is not None:
                self.slots.revoke(lease, now)
        for token in notice.held:
            lease = self.read(token)
            if lease is not None:
                self.slots.hold(lease, stream, now)
