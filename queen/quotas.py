"""What one client may hold at once: open Infer streams, requests waiting for a slot, direct
leases; and the request references it has in flight. Pure: counts in, refusals out.

A client is the name of its token's identity (`clients` in the tokens file; the single
`client` token is "client", the admin token "admin"), so one busy application cannot take
what another is owed. The service decides the name; these classes only count.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True)
class Refusal:
    """Why a client may not have more; `code` is a grpc.StatusCode name."""

    code: str
    message: str


class Quota:
    """How many of one thing each client holds, up to `limit` each (0: no limit)."""

    def __init__(self, what: str, flag: str, limit: int, advice: str) -> None:
        self.what = what
        self.flag = flag
        self.limit = limit
        self.advice = advice
        self._held: dict[str, int] = {}

    def held(self, client: str) -> int:
        return self._held.get(client, 0)

    def acquire(self, client: str) -> Refusal | None:
        """Count one more for `client`, or say why not (then nothing is counted)."""
        if self.limit and self.held(client) >= self.limit:
            return Refusal(
                "RESOURCE_EXHAUSTED",
                f"client {client!r} already has {self.limit} {self.what} (the limit per client, "
                f"{self.flag}); {self.advice}",
            )
        self._held[client] = self.held(client) + 1
        return None

    def release(self, client: str) -> None:
        held = self.held(client)
        if held <= 1:
            # Forget clients that hold nothing: the table stays as small as the busy ones.
            self._held.pop(client, None)
        else:
            self._held[client] = held - 1


@dataclass
class Quotas:
    """The three per-client limits of the Queen service."""

    streams: Quota
    queued: Quota
    leases: Quota

    @classmethod
    def of(cls, max_streams: int = 0, max_queued: int = 0, max_leases: int = 0) -> Quotas:
        return cls(
            streams=Quota(
                "Infer streams open", "--max-streams-per-client", max_streams,
                "wait for one to finish",
            ),
            queued=Quota(
                "requests waiting for a slot", "--max-queued-per-client", max_queued,
                "retry when some of them have been served",
            ),
            leases=Quota(
                "active direct leases", "--max-leases-per-client", max_leases,
                "use or release (Queen.ReleaseLease) one first",
            ),
        )  # fmt: skip


class References:
    """The request_ids each client has in flight: a client's reference names one request."""

    def __init__(self) -> None:
        self._in_flight: set[tuple[str, str]] = set()

    def claim(self, client: str, reference: str) -> Refusal | None:
        """Take `reference` for `client` ('' claims nothing), or say it is taken."""
        if not reference:
            return None
        key = (client, reference)
        if key in self._in_flight:
            return Refusal(
                "ALREADY_EXISTS",
                f"request_id {reference!r} is already in flight for client {client!r}; "
                "a request_id names one request at a time",
            )
        self._in_flight.add(key)
        return None

    def drop(self, client: str, reference: str) -> None:
        self._in_flight.discard((client, reference))

    def __len__(self) -> int:
        return len(self._in_flight)


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string: 'ipv4:10.0.0.5:41234' -> '10.0.0.5',
    'ipv6:[::1]:41234' -> '::1', 'unix:/path' -> 'unix:/path'."""
    kind, _, address = peer.partition(":")
    address = unquote(address)  # grpc writes ipv6 brackets as %5B..%5D
    if kind == "ipv6" and address.startswith("["):
        return address[1:].partition("]")[0]
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0] or address
    return peer
