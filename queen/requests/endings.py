"""How a request ended, said the same way in its history row, its event and its metric.

Pure: a status (or a gRPC code name, or what is known when the call ended early) in, the
words out. A call can end before its request does: the client cancels or goes away, or its
deadline passes (while waiting for a slot, or mid-stream). Which of the two it was is read
from the time left on the call when it ended. (What a stopping queen says is
queen/stopping.py's; how long a request may wait for a slot, the desk's.)
"""

from __future__ import annotations

from protos.v1 import queen_pb2

# A call that ends this close to its deadline ended because of it: the client's own timer
# fires before the queen's (ours started when the request arrived) and its cancel reaches us
# a moment before our deadline would.
DEADLINE_SLACK = 0.1


LABELS: dict[queen_pb2.RequestStatus.ValueType, str] = {
    queen_pb2.REQUEST_STATUS_COMPLETED: "completed",
    queen_pb2.REQUEST_STATUS_FAILED: "failed",
    queen_pb2.REQUEST_STATUS_CANCELLED: "cancelled",
    queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED: "deadline_exceeded",
}


def label(status: queen_pb2.RequestStatus.ValueType) -> str:
    """The status in words, as logs say it."""
    return LABELS.get(status, "failed")


def code_of(status: queen_pb2.RequestStatus.ValueType, error: str) -> str:
    """The gRPC status code name the client got: OK, or the one the error text starts with
    (every error recorded here does: 'UNAVAILABLE: ...')."""
    if status == queen_pb2.REQUEST_STATUS_COMPLETED:
        return "OK"
    if status == queen_pb2.REQUEST_STATUS_CANCELLED:
        return "CANCELLED"
    if status == queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED:
        return "DEADLINE_EXCEEDED"
    name = error.split(":", 1)[0]
    return name if name in CODE_NAMES else "UNKNOWN"


CODE_NAMES = frozenset(
    """OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS
    PERMISSION_DENIED RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE UNIMPLEMENTED
    INTERNAL UNAVAILABLE DATA_LOSS UNAUTHENTICATED""".split()
)


def event_kind(status: queen_pb2.RequestStatus.ValueType) -> queen_pb2.EventKind.ValueType:
    """Completed, cancelled, or failed (a passed deadline included: the detail says so)."""
    if status == queen_pb2.REQUEST_STATUS_COMPLETED:
        return queen_pb2.EVENT_KIND_REQUEST_COMPLETED
    if status == queen_pb2.REQUEST_STATUS_CANCELLED:
        return queen_pb2.EVENT_KIND_REQUEST_CANCELLED
    return queen_pb2.EVENT_KIND_REQUEST_FAILED


def status_of_error(code_name: str) -> queen_pb2.RequestStatus.ValueType:
    """The status of a request the queen ended with this gRPC status code."""
    if code_name == "DEADLINE_EXCEEDED":
        return queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED
    return queen_pb2.REQUEST_STATUS_FAILED


def call_ended(
    time_remaining: float | None, attempts: int, delivered: int
) -> tuple[queen_pb2.RequestStatus.ValueType, str]:
    """The status and error text of a request whose call ended first, given the seconds the
    call had left then (None: no deadline), the attempts begun and the token chunks the
    client was sent."""
    if attempts:
        where = f"after {delivered} token chunk(s) were delivered"
    else:
        where = "while the request waited for a free worker"
    if time_remaining is not None and time_remaining <= DEADLINE_SLACK:
        return (
            queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED,
            f"DEADLINE_EXCEEDED: the client's deadline passed {where}",
        )
    return queen_pb2.REQUEST_STATUS_CANCELLED, f"CANCELLED: the call was cancelled {where}"
