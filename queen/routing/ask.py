"""What routing is asked and what it hands out: one frozen `Ask` travels from the request to the
pick (instead of the same five parameters copied through every signature), a `Slot` comes back
carrying the policy decided for it, and an `Outcome` goes back with the slot.

Pure values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from protos.v1 import common_pb2
from queen.routing.prefix_index import Want


@dataclass(frozen=True)
class Ask:
    """A request's needs of a worker: its model, the tags the worker must carry, the routing
    policy asked for (UNSPECIFIED: the queen's, else the model's default), what a cache-aware
    pick reads (the prompt's prefix and session; None for a lease), and the addresses already
    tried for it."""

    model: str
    tags: frozenset[str] = frozenset()
    policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED
    want: Want | None = None
    exclude: frozenset[str] = frozenset()

    def excluding(self, address: str) -> Ask:
        """The same ask, with one more address not to try again."""
        return dataclasses.replace(self, exclude=self.exclude | {address})


@dataclass(frozen=True)
class Slot:
    """One slot on one worker, held by one request (or one direct lease); `policy` is the
    routing policy that picked it (decided once, at the pick, and recorded from here)."""

    worker_id: str
    hive_id: str
    address: str
    model: str
    policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED


@dataclass(frozen=True)
class Outcome:
    """How a slot's use ended. ok=None: it was never used (cancelled, handed back)."""

    ok: bool | None
    duration: float = 0.0
    tokens: int = 0
    # The worker is to blame (unreachable, crashed mid-stream): counts for the circuit breaker.
    worker_fault: bool = False
