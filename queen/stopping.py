"""What a stopping queen says of the requests it ends: those that arrive (refused), those still
waiting for a slot (ended at once), and streams still running when its grace runs out (cut).
Each is told so, and what to do; the statuses also carry the apiary-stopping trailer
(apiary/errors.py, `status`), which is what clients act on.
"""

from __future__ import annotations

import grpc

from apiary.errors import StatusError

SHUTTING_DOWN = "queen shutting down"
RETRY_ELSEWHERE = "retry against another queen, or once this one has restarted"


def refused_while_stopping() -> str:
    """UNAVAILABLE's message for a request that arrives while the queen is stopping."""
    return f"{SHUTTING_DOWN}: it takes no new requests; {RETRY_ELSEWHERE}"


def ended_while_waiting() -> str:
    """UNAVAILABLE's message for a request still waiting for a slot when the queen stops."""
    return (
        f"{SHUTTING_DOWN}: the request was still waiting for a free worker and nothing was "
        f"sent; {RETRY_ELSEWHERE}"
    )


def cut_by_shutdown(grace: float, attempts: int, delivered: int) -> str:
    """UNAVAILABLE's message for a stream still running when the queen's --shutdown-grace ran
    out, given the attempts begun and the token chunks the client was sent."""
    if attempts:
        where = f"after {delivered} token chunk(s) were delivered"
    else:
        where = "before any worker was called"
    return (
        f"{SHUTTING_DOWN}: the stream was ended {where}, when the queen's --shutdown-grace of "
        f"{grace:g} s ran out; {RETRY_ELSEWHERE}"
    )


def status(message: str) -> StatusError:
    """UNAVAILABLE with `message`, marked as a stopping queen's (the apiary-stopping trailer)."""
    return StatusError(grpc.StatusCode.UNAVAILABLE, message, stopping=True)
