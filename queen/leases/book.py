"""The queen's book of direct leases: which are out, on which worker, in use or not, and
when an unused one runs out. Pure: times are given (the queen clock's monotonic time), the caller
gives slots back and runs the leases' endings.

A lease is reserved until the call using it ends (the worker reports it), until it is given
back, or, unused, until its TTL and a short grace have passed (`deadline`): the grace covers a
call the worker accepted just before the expiry and reported a moment later.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from queen.routing.ask import Slot


def _nothing() -> None:
    pass


@dataclass(eq=False)
class Lease:
    """A slot handed to a client to call its worker directly."""

    id: str
    # What the client got (LeaseResponse.lease_id), and what the worker checks.
    token: str
    slot: Slot
    # When the queen takes the slot back if no call has used it (monotonic).
    deadline: float
    # The end of the lease on the queen's wall clock (as the token says).
    expires_at: float
    # Who took it: only they (or an admin) may give it back.
    owner: str = ""
    # Called once when the lease ends, however it ends.
    on_end: Callable[[], None] = field(default=_nothing)
    # When the worker said a call with it started (monotonic); None: unused so far.
    started: float | None = None


class LeaseBook:
    def __init__(self) -> None:
        self.active: dict[str, Lease] = {}
        # (deadline, lease id) of leases out, unused when pushed; stale entries are skipped.
        self._deadlines: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self.active)

    def add(self, lease: Lease) -> None:
        self.active[lease.id] = lease
        heapq.heappush(self._deadlines, (lease.deadline, lease.id))
        if len(self._deadlines) > 2 * len(self.active) + 64:
            self._compact()

    def _compact(self) -> None:
        """Drop the entries of leases that ended or started (their deadline no longer counts)."""
        self._deadlines = [
            (lease.deadline, lease.id) for lease in self.active.values() if lease.started is None
        ]
        heapq.heapify(self._deadlines)

    def next_deadline(self) -> float | None:
        """The earliest deadline of an unused lease (None: no lease is waiting to be used)."""
        deadlines = self._deadlines
        while deadlines:
            deadline, lease_id = deadlines[0]
            lease = self.active.get(lease_id)
            if lease is not None and lease.started is None and lease.deadline == deadline:
                return deadline
            heapq.heappop(deadlines)
        return None

    def due(self, now: float) -> list[Lease]:
        """Unused leases whose deadline has passed, taken out of the book."""
        expired = []
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, lease_id = heapq.heappop(self._deadlines)
            expired.append(self.active.pop(lease_id))
        return expired

    def start(self, lease_id: str, worker_id: str, now: float) -> Lease | None:
        """Worker `worker_id` says a call with the lease started (None: not one of its
        leases that is out and unused: ended, given back, or another worker's)."""
        lease = self.active.get(lease_id)
        if lease is None or lease.slot.worker_id != worker_id or lease.started is not None:
            return None
        lease.started = now
        return lease

    def end(self, lease_id: str, worker_id: str) -> Lease | None:
        """Worker `worker_id` says the call with the lease ended: taken out of the book."""
        lease = self.active.get(lease_id)
        if lease is None or lease.slot.worker_id != worker_id:
            return None
        return self.active.pop(lease_id)

    def give_back(self, lease_id: str, by: str | None = None) -> Lease | None:
        """The lease given back early, taken out of the book. With `by`, only its owner may
        (to anyone else a lease id names nothing)."""
        lease = self.active.get(lease_id)
        if lease is None or (by is not None and by != lease.owner):
            return None
        return self.active.pop(lease_id)

    def of_worker(self, worker_id: str) -> Iterator[Lease]:
        """Leases out on a worker (O(leases): when its lease stream comes or goes)."""
        return (lease for lease in self.active.values() if lease.slot.worker_id == worker_id)
