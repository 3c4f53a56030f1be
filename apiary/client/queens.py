"""Which queens a client dials, in which order, and which failures another queen may repair:
the failover rules, kept apart from the sockets so they can be tested as plain values."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import grpc

from apiary.errors import answered, stopping

QUEEN_ENV = "APIARY_QUEEN"
TOKEN_ENV = "APIARY_TOKEN"
DEFAULT_QUEEN = "127.0.0.1:7070"
# Every call has a deadline unless asked otherwise (math.inf: none).
DEFAULT_TIMEOUT = 60.0

# What grpc says when a call never left this machine for a queen (no connection could be
# made: refused, unresolvable, TLS handshake failed). These words and a stopping queen's
# trailer (apiary.errors.STOPPING) are all that prove a request was not served: a reset
# connection may have carried it, and retrying a spawn elsewhere could start two workers.
NOT_CONNECTED = ("failed to connect to all addresses", "errors resolving", "dns resolution failed")


def queens_from(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """'A,B' or ['A', 'B'], else $APIARY_QUEEN, else 127.0.0.1:7070; each address once."""
    if value is None:
        value = os.environ.get(QUEEN_ENV, "") or DEFAULT_QUEEN
    parts = value.split(",") if isinstance(value, str) else list(value)
    queens = tuple(dict.fromkeys(part.strip() for part in parts if part.strip()))
    if not queens:
        raise ValueError("no queen address given")
    return queens


def unreached(exc: grpc.RpcError) -> bool:
    """The call never got to a queen that would serve it, so another queen (or the same one,
    once it is back) may take it without it being done twice."""
    if not isinstance(exc, grpc.aio.AioRpcError | grpc.Call):
        return False
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    if stopping(exc):
        return True  # a stopping queen ended it unserved, or cut it (a stream resumes)
    # A queen's own failure may quote a worker's "failed to connect": it was served.
    details = (exc.details() or "").lower()
    return not answered(exc) and any(text in details for text in NOT_CONNECTED)


# How a stream's queen going away mid-stream reads (its process killed, its host cut off): the
# stream can resume on another queen. A worker's failure relayed by a live queen reads as the
# queen's own message instead, and is the caller's to see.
# A host cut off is noticed by the client's keepalive pings (transport.CLIENT_OPTIONS): grpc
# says "Stream removed (recvmsg:Connection timed out (110))" or "keepalive watchdog timeout".
QUEEN_LOST = ("socket closed", "connection reset", "stream removed", "broken pipe",
              "connection refused", "goaway", "end of tcp stream", "keepalive",
              "connection timed out")  # fmt: skip
# Times a stream resumes on another queen before its failure is the caller's.
MAX_RESUMES = 3


def queen_lost(exc: grpc.RpcError) -> bool:
    """The stream's queen went away (or stopped and cut it): the rest may come from another."""
    if unreached(exc):
        return True
    if not isinstance(exc, grpc.aio.AioRpcError | grpc.Call) or answered(exc):
        return False  # a live queen ended it on purpose, even quoting a connection error
    details = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNAVAILABLE and any(t in details for t in QUEEN_LOST)


def grpc_timeout(seconds_left: float) -> float | None:
    """The `timeout=` a grpc call takes: None for no deadline (math.inf)."""
    return None if math.isinf(seconds_left) else max(seconds_left, 0.0)


def deadline_passed(timeout: float) -> grpc.aio.AioRpcError:
    """The error of a call whose deadline passed before any queen could be asked: the same
    kind as every other failure the client reports."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        f"deadline of {timeout:g} s passed before any queen could be asked",
        None,
    )


class Rotation:
    """The order to try queens in: the one that answered last first (it is probably up), then
    the others in the order given."""

    def __init__(self, queens: tuple[str, ...]) -> None:
        self.queens = queens
        self._first = 0

    def order(self) -> list[str]:
        count = len(self.queens)
        return [self.queens[(self._first + step) % count] for step in range(count)]

    def answered(self, address: str) -> None:
        if address in self.queens:
            self._first = self.queens.index(address)


class Backoff:
    """Pauses between rounds over every queen while none can be reached (a restart): short at
    first, so a queen coming back is found within about half a second, then capped."""

    FIRST = 0.05
    LONGEST = 0.5

    def __init__(self) -> None:
        self._next = self.FIRST

    def pause(self, seconds_left: float) -> float:
        """How long to wait before the next round; never past the deadline."""
        pause = min(self._next, seconds_left)
        self._next = min(self._next * 2, self.LONGEST)
        return max(pause, 0.0)
