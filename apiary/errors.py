"""One exception that carries a gRPC status, raised deep and answered once at the RPC edge, and
the mark on every status one of our servers gives itself."""

from __future__ import annotations

from typing import Any

import grpc

# Trailing metadata every call answered by one of our servers carries (apiary/serving.py sets it
# first thing), whatever its status: a failure with it was a live server's decision, one without
# it came from the connection (the server died or could not be reached). The words of a status
# cannot tell them apart: a queen's own message may quote a worker's connection error.
ANSWERED_KEY = "apiary-answered"
ANSWERED = ((ANSWERED_KEY, "1"),)
# Added to a status a stopping queen gives a request it did not serve (refused, or ended while it
# waited for a worker) or cut at the end of its grace: another queen may take the call. A mark,
# not words, so a failover decision never reads prose.
STOPPING_KEY = "apiary-stopping"
STOPPING = (*ANSWERED, (STOPPING_KEY, "1"))


def _has_trailer(exc: grpc.RpcError, key: str) -> bool:
    # grpc.aio's errors are not grpc.Call, but both have trailing_metadata().
    trailing = getattr(exc, "trailing_metadata", None)
    pairs: Any = (trailing() if callable(trailing) else None) or ()
    return any(pair[0] == key for pair in pairs)


def answered(exc: grpc.RpcError) -> bool:
    """The status was given by a live server of ours (not made by the transport)."""
    return _has_trailer(exc, ANSWERED_KEY)


def stopping(exc: grpc.RpcError) -> bool:
    """The status was given by a queen that is shutting down (see STOPPING)."""
    return _has_trailer(exc, STOPPING_KEY)


class StatusError(Exception):
    """Ends a call with `code` and a message a person can act on."""

    def __init__(self, code: grpc.StatusCode, message: str, stopping: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Given because the server is shutting down (see STOPPING).
        self.stopping = stopping

    @property
    def trailers(self) -> tuple[tuple[str, str], ...]:
        """The trailing metadata the call ends with."""
        return STOPPING if self.stopping else ANSWERED

    def __str__(self) -> str:
        return self.message
