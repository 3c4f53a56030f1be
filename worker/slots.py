"""A worker's own slot accounting: calls in flight and slots held for direct leases.

Pure: the server asks before it starts a call or holds a slot, and reports
when a call ends and a hold expires or goes. The worker enforces its slots
itself because the queen's view can be a moment behind, and a lease holder
calls the worker directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """Why a call or a hold is refused: the gRPC status (by name) and the message."""

    code: str
    message: str


@dataclass
class Hold:
    """A slot the queen reserved (Queen.Lease) for a client that will call us directly."""

    used: bool = False
    expired: bool = False


class Slots:
    def __init__(self, worker_id: str, total: int) -> None:
        self.worker_id = worker_id
        self.total = total
        self.in_flight = 0
        self.holds: dict[str, Hold] = {}

    def unused_holds(self) -> int:
        """Held slots no call has used yet (an expired one counts until its hold is dropped)."""
        return sum(1 for hold in self.holds.values() if not hold.used)

    @property
    def free(self) -> int:
        return max(self.total - self.in_flight - self.unused_holds(), 0)

    def _full(self) -> bool:
        return self.in_flight + self.unused_holds() >= self.total

    def usable(self, lease_id: str) -> bool:
        """A lease this worker holds and no call has used or outlived: a client's credential."""
        hold = self.holds.get(lease_id)
        return hold is not None and not hold.used and not hold.expired

    def start(self, lease_id: str = "") -> Refusal | None:
        """Take a slot for a call (the lease's slot if it names one), or say why not."""
        if lease_id:
            hold = self.holds.get(lease_id)
            if hold is None or hold.used or hold.expired:
                return Refusal(
                    "FAILED_PRECONDITION",
                    f"lease {lease_id!r} is unknown, expired or already used on "
                    f"worker {self.worker_id}; ask the queen for a new lease",
                )
            hold.used = True
        elif self._full():
            return Refusal(
                "RESOURCE_EXHAUSTED",
                f"worker {self.worker_id} has all {self.total} slot(s) "
                "in use; retry or send to another worker",
            )
        self.in_flight += 1
        return None

    def finish(self) -> None:
        """A call ended, however it went."""
        self.in_flight -= 1

    def reserve(self, lease_id: str, ttl_seconds: float, serving: bool) -> Refusal | None:
        """Hold a slot for `lease_id` until it is used, expires or is dropped; or say why not."""
        if not lease_id or lease_id in self.holds:
            return Refusal("INVALID_ARGUMENT", "lease_id is required and must be new")
        if ttl_seconds <= 0:
            return Refusal("INVALID_ARGUMENT", "ttl_seconds must be > 0")
        if not serving:
            return Refusal("UNAVAILABLE", "worker is not serving")
        if self._full():
            return Refusal(
                "RESOURCE_EXHAUSTED", f"worker {self.worker_id} has no free slot to hold"
            )
        self.holds[lease_id] = Hold()
        return None

    def expire(self, lease_id: str) -> None:
        """Its TTL passed unused: no call may use it any more."""
        hold = self.holds.get(lease_id)
        if hold is not None:
            hold.expired = True

    def drop(self, lease_id: str) -> None:
        """The hold's stream ended (used, expired or given back): its slot is free again."""
        self.holds.pop(lease_id, None)
