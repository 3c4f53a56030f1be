"""Whether a request whose attempt failed is tried again, and what the failure counts as.

Pure: plain values in, a `Decision` out; the route (queen/requests/route.py) carries it
out. Before the first chunk reaches the client a failed attempt is retried on
another worker (up to 3 attempts, backoff 0.1 s doubling, within the client's
deadline). After it, a worker's fault moves the stream to another worker, which
continues from the exact token reached (queen/requests/progress.py; at once, up to
--migration-limit moves); a stream that cannot move ends with UNAVAILABLE saying
how much was delivered and why.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace

import grpc

from apiary.errors import StatusError
from queen.routing.ask import Outcome, Slot

MAX_ATTEMPTS = 3
BACKOFF_SECONDS = 0.1
# Worker answers that are the worker's fault (for statistics and the circuit breaker).
WORKER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.ABORTED,
    }
)
# Worker answers that mean "try another worker" when no chunk has been sent yet: its faults,
# and its own slot check refusing a request our (stale) view sent it.
RETRYABLE = WORKER_FAULTS | {grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass(frozen=True)
class Failure:
    """How one attempt ended early: the worker's gRPC status, or (code None) its hive lost."""

    worker_id: str
    address: str
    code: grpc.StatusCode | None
    # The status details, or why the hive counts as lost.
    details: str | None

    @property
    def cause(self) -> str:
        """ "CODE: details" (or "hive lost: why"), as error texts say it."""
        return f"{self.code.name if self.code is not None else 'hive lost'}: {self.details}"


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt."""

    # How the worker's slot was used, for its statistics and circuit breaker.
    outcome: Outcome
    retry: bool
    # Why the client gets no stream (set exactly when not retrying).
    error: StatusError | None = None
    # A failover: counted and logged, whether or not another attempt follows.
    failover: bool = False
    # The worker's address, not to be tried again for this request ("" = may be tried again).
    exclude: str = ""
    mark_unreachable: bool = False
    backoff: float = 0.0
    # What the final error says went wrong last, if every attempt fails.
    last_error: str = ""
    # Mid-stream: the next attempt continues the completion (queen/requests/progress.py).
    migrate: bool = False


def decide(
    failure: Failure, attempt: int, chunks_sent: int, time_left: float | None, model: str,
    movable: bool = False, stuck: str = "",
) -> Decision:  # fmt: skip
    """After attempt number `attempt` (from 1) failed with `chunks_sent` chunks relayed and
    `time_left` seconds before the client's deadline (None: no deadline). `movable`: the
    stream can go on on another worker (else `stuck` may say why not)."""
    code = failure.code
    if code is None:
        # No chunk can have been sent: the hive is noticed lost only while awaiting the first.
        decision = Decision(
            outcome=Outcome(ok=False, worker_fault=True),
            retry=True,
            failover=True,
            exclude=failure.address,
            last_error=failure.details or "",
        )
    else:
        decision = _after_status(failure, code, chunks_sent, stuck if not movable else None)
    if not decision.retry:
        return decision
    if decision.migrate:
        # The client is mid-stream: go on at once, whatever the attempts so far.
        if time_left is not None and time_left <= 0:
            return replace(
                decision, retry=False, error=gave_up(model, attempt, failure_text(failure))
            )
        return decision
    backoff = BACKOFF_SECONDS * 2 ** (attempt - 1)
    if attempt >= MAX_ATTEMPTS or (time_left is not None and backoff >= time_left):
        error = gave_up(model, attempt, decision.last_error)
        return replace(decision, retry=False, error=error)
    return replace(decision, backoff=backoff)


def _after_status(
    failure: Failure, code: grpc.StatusCode, chunks_sent: int, stuck: str | None
) -> Decision:
    fault = Outcome(ok=False, worker_fault=code in WORKER_FAULTS)
    if chunks_sent and stuck is None and code in WORKER_FAULTS:
        return Decision(
            outcome=fault,
            retry=True,
            migrate=True,
            exclude=failure.address,
            mark_unreachable=code == grpc.StatusCode.UNAVAILABLE,
            last_error=failure_text(failure),
        )
    if chunks_sent:
        # Not moved (it cannot be, or the worker refused the request itself): say why.
        return Decision(
            outcome=fault,
            retry=False,
            error=stranded(failure, chunks_sent, stuck or ""),
        )
    if code not in RETRYABLE:
        return Decision(
            outcome=fault, retry=False, error=StatusError(code, failure.details or code.name)
        )
    full = code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return Decision(
        # A full worker: a stale view of its slots, not a failure.
        outcome=Outcome(ok=None) if full else fault,
        retry=True,
        failover=True,
        # By address, not id: a worker restarted under the same id is a new process. A full
        # worker is not excluded: it frees in a moment (our view was just ahead of it), and
        # may be the only one there is.
        exclude="" if full else failure.address,
        mark_unreachable=code == grpc.StatusCode.UNAVAILABLE,
        last_error=failure_text(failure),
    )


def failure_text(failure: Failure) -> str:
    return f"worker {failure.worker_id}: {failure.cause}"


def every_worker_tried(tried: Collection[str], addresses: Iterable[str]) -> bool:
    """Checked before each further attempt: every worker there is failed this request, so say
    so now, not at the deadline. `addresses` is read only if something was tried."""
    return bool(tried) and all(address in tried for address in addresses)


def stranded(failure: Failure, chunks_sent: int, why: str) -> StatusError:
    """The error of a stream its worker failed mid-way and no other worker continued."""
    return StatusError(
        grpc.StatusCode.UNAVAILABLE,
        f"worker {failure.worker_id} failed after {chunks_sent} token chunk(s) were delivered "
        f"({failure.cause}); the stream is incomplete" + (f"; {why}" if why else ""),
    )


def gave_up(model: str, attempts: int, last_error: str) -> StatusError:
    return StatusError(
        grpc.StatusCode.UNAVAILABLE,
        f"no worker of model {model!r} could serve the request after "
        f"{attempts} attempt(s); last error: {last_error}",
    )


def failure_of(exc: Exception, slot: Slot) -> Failure:
    """An attempt's failure (a worker's status, or its hive lost) as `decide` takes it."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return Failure(slot.worker_id, slot.address, exc.code(), exc.details())
    return Failure(slot.worker_id, slot.address, None, str(exc))
