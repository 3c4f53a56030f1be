"""A worker's own slot accounting: calls in flight, slots held for direct leases, spent leases.

Pure: the server asks before it starts a call, and reports when a call ends and
what the queen's lease stream says (holds, revocations, the stream's end). Times
are on the queen's clock (the server keeps the offset). The worker enforces its
slots itself because the queen's view can be a moment behind, and a lease holder
calls the worker directly.

A lease arrives as a token the worker checks by itself (apiary/leasetoken.py): a
call may carry one the queen has not announced yet, and it is served if no call is
using the slot (holds may be a moment stale: a released one is revoked in the next
batch). A lease the queen did announce (a hold) keeps its slot from other callers
until it is used, expires, is revoked or the stream that announced it ends. Either
way a lease is good for one call: its id is spent until it expires.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from apiary.leasetoken import LeaseToken


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused: the gRPC status (by name) and the message."""

    code: str
    message: str


@dataclass(frozen=True)
class Hold:
    """A slot the queen reserved (Queen.Lease) for a client that will call us directly."""

    expires_at: float
    # Which lease stream announced it: the hold goes when that stream does.
    stream: int


class Slots:
    def __init__(self, worker_id: str, total: int) -> None:
        self.worker_id = worker_id
        self.total = total
        self.in_flight = 0
        self.holds: dict[str, Hold] = {}
        # Lease ids used or revoked, until they expire: a lease is good for one call.
        self.spent: dict[str, float] = {}
        # (expiry, lease id) of holds and spent ids, so expired ones go without a scan.
        self._expiries: list[tuple[float, str]] = []

    @property
    def free(self) -> int:
        return max(self.total - self.in_flight - len(self.holds), 0)

    def lease_problem(self, lease: LeaseToken, now: float) -> str:
        """Why this (authentic) lease cannot start a call now ('' if it can)."""
        self.expire(now)
        if lease.expires_at <= now:
            return "expired"
        if lease.lease_id in self.spent:
            return "already used"
        return ""

    def start(self, lease: LeaseToken | None = None, now: float = 0.0) -> Refusal | None:
        """Take a slot for a call (the lease's held slot if it has one), or say why not."""
        if lease is not None:
            problem = self.lease_problem(lease, now)
            if problem:
                return Refusal(
                    "FAILED_PRECONDITION",
                    f"lease {lease.lease_id!r} is {problem} on worker {self.worker_id}; "
                    "ask the queen for a new lease",
                )
        # A call with a lease needs only a slot no call is using: the queen signed the lease, so
        # its books have a slot for it, while ours may still hold one the queen has since
        # released (its revocation comes a moment later, batched). Any other call needs a slot
        # no lease holds.
        taken = self.in_flight + (0 if lease is not None else len(self.holds))
        if taken >= self.total:
            return Refusal(
                "RESOURCE_EXHAUSTED",
                f"worker {self.worker_id} has all {self.total} slot(s) "
                "in use; retry or send to another worker",
            )
        if lease is not None:
            self.holds.pop(lease.lease_id, None)
            self._spend(lease)
        self.in_flight += 1
        return None

    def finish(self) -> None:
        """A call ended, however it went."""
        self.in_flight -= 1

    def hold(self, lease: LeaseToken, stream: int, now: float) -> bool:
        """The queen handed out `lease` on us: keep a slot for it. False if there is nothing
        to hold (spent, expired, already held, or every slot held already)."""
        if self.lease_problem(lease, now) or lease.lease_id in self.holds:
            return False
        if len(self.holds) >= self.total:
            return False  # the queen's view was behind ours; the lease still works if free
        self.holds[lease.lease_id] = Hold(lease.expires_at, stream)
        heapq.heappush(self._expiries, (lease.expires_at, lease.lease_id))
        return True

    def revoke(self, lease: LeaseToken, now: float) -> None:
        """The lease was given back unused: its slot is free and no call may use it."""
        self.expire(now)
        self.holds.pop(lease.lease_id, None)
        if lease.expires_at > now:
            self._spend(lease)

    def drop_holds(self, stream: int) -> int:
        """The lease stream `stream` ended (its queen is gone or restarting): the slots it
        held are free again. Their tokens still work while a slot is free. How many."""
        gone = [lease_id for lease_id, hold in self.holds.items() if hold.stream == stream]
        for lease_id in gone:
            del self.holds[lease_id]
        return len(gone)

    def expire(self, now: float) -> None:
        """Forget holds and spent ids whose lease has expired (a spent id cannot be replayed
        once it has: the expiry refuses it)."""
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, lease_id = heapq.heappop(expiries)
            hold = self.holds.get(lease_id)
            if hold is not None and hold.expires_at <= now:
                del self.holds[lease_id]
            spent = self.spent.get(lease_id)
            if spent is not None and spent <= now:
                del self.spent[lease_id]

    def _spend(self, lease: LeaseToken) -> None:
        if lease.lease_id not in self.spent:
            self.spent[lease.lease_id] = lease.expires_at
            heapq.heappush(self._expiries, (lease.expires_at, lease.lease_id))
