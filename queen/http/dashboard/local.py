"""The dashboard's calls to the admin servicer, made in-process.

The page's actions run the very QueenAdminService methods the CLI's RPCs run, on the same
objects; only the transport differs. In-process rather than a loopback gRPC channel to the
queen itself: that channel would need the queen's gRPC address to be reachable from itself
(it may listen on one interface only), a client certificate when the queen asks for one
(mTLS), and a token to present (the operator's, carried across one more hop). The gate
(queen/http/dashboard/gate.py) has already applied the gRPC door's rules to the caller.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc

from apiary.errors import StatusError
from apiary.serving import Context
from queen.http.errors import from_status

Request = TypeVar("Request")
Reply = TypeVar("Reply")

# How long an action may take: a graceful retire waits for the worker's streams and its
# stop grace; a listing is quick.
ACTION_TIMEOUT = 120.0
READ_TIMEOUT = 15.0


class LocalCall:
    """What a servicer method uses of its gRPC context, for a call made in-process: the
    time left, and abort() ending the call with a status (raised as StatusError)."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout

    def time_remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        raise StatusError(code, details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "dashboard"


async def call(
    handler: Callable[[Request, Context], Awaitable[Reply]],
    request: Request,
    timeout: float = READ_TIMEOUT,
) -> Reply:
    """The servicer's reply, or its refusal as the HTTP error the front maps that status to
    (the refusal's own text, as the CLI would print it)."""
    try:
        return await handler(request, cast(Context, LocalCall(timeout)))
    except StatusError as refused:
        raise from_status(refused.code.name, refused.message) from None
