"""One request's record, fanned out to the history, the event bus, the metrics and the log: taken,
each attempt started, each move, and its end, which is recorded exactly once however the request
ends (see queen/requests/route.py)."""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from dataclasses import dataclass

import structlog

from protos.v1 import common_pb2, queen_pb2
from queen.cluster import Cluster
from queen.metrics import Usage
from queen.requests import endings
from queen.requests.retry import Failure
from queen.routing.ask import Slot

log = structlog.get_logger("queen.requests.record")

# The longest a stream's end waits for its history row to be committed (normally well under a
# millisecond); past it the stream ends all the same.
COMMIT_WAIT = 5.0


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the client (its token's name, or its host without tokens) and the
    client's own reference for it (its request_id, or '')."""

    client: str = ""
    reference: str = ""


@dataclass
class Counts:
    """How far a request got, as its record tells it."""

    # Chunks read from workers; messages with text that reached the client (several chunks
    # may go as one); the tokens in those; the worker's own count of tokens, once it says it.
    sent: int = 0
    delivered: int = 0
    delivered_tokens: int = 0
    tokens: int = 0
    # The prompt's tokens and how many a worker had cached, once the worker says so.
    prompt_tokens: int = 0
    cached_tokens: int = 0
    first_chunk_after: float | None = None


class RequestRecord:
    """What the queen says of one request, everywhere it says it."""

    def __init__(self, cluster: Cluster, request: common_pb2.InferRequest, caller: Caller) -> None:
        self.cluster = cluster
        self.request = request
        self.caller = caller
        self.counts = Counts()
        self.began = time.perf_counter()
        self.attempts = 0
        # The current (or last) attempt's slot.
        self.slot: Slot | None = None
        self.recorded = False

    def _emit(self, kind: queen_pb2.EventKind.ValueType, **fields: object) -> None:
        self.cluster.events.emit(
            kind,
            self.cluster.clock.time(),
            request_id=self.request.request_id,
            client_request_id=self.caller.reference,
            model=self.request.model,
            **fields,
        )

    def accepted(self) -> None:
        cluster, request, caller = self.cluster, self.request, self.caller
        cluster.history.accepted(
            request.request_id, request.model, cluster.clock.time(), caller.client, caller.reference
        )
        self._emit(queen_pb2.EVENT_KIND_REQUEST_QUEUED)

    def started(self, slot: Slot) -> None:
        """An attempt began on `slot`, with the policy that picked it."""
        cluster = self.cluster
        self.attempts += 1
        self.slot = slot
        cluster.history.started(
            self.request.request_id, slot.worker_id, slot.hive_id, cluster.clock.time(),
            self.attempts, slot.policy,
        )  # fmt: skip
        self._emit(
            queen_pb2.EVENT_KIND_REQUEST_STARTED, worker_id=slot.worker_id, hive_id=slot.hive_id
        )

    def chunk(self, chunk: common_pb2.InferChunk) -> None:
        """A worker's chunk was read for the client."""
        counts = self.counts
        if counts.sent == 0:
            counts.first_chunk_after = time.perf_counter() - self.began
        counts.sent += 1
        if chunk.completion_tokens:
            counts.tokens = chunk.completion_tokens
        if chunk.prompt_tokens:
            counts.prompt_tokens = chunk.prompt_tokens
            counts.cached_tokens = chunk.cached_prompt_tokens

    def delivered(self, chunk: common_pb2.InferChunk) -> None:
        """A message reached the client (its yield returned)."""
        if chunk.text:
            self.counts.delivered += 1
            self.counts.delivered_tokens += len(chunk.token_ids) or 1

    def failed_over(self, failure: Failure) -> None:
        """An attempt failed before its first chunk; the request tries another worker."""
        if failure.code is None:
            log.warning("hive lost before first chunk; trying another", worker_id=failure.worker_id)
        else:
            log.warning(
                "worker failed before first chunk; trying another", worker_id=failure.worker_id,
                code=failure.code.name, attempt=self.attempts,
            )  # fmt: skip
        self.cluster.metrics.failovers.labels(self.request.model).inc()

    def migrated(self, failure: Failure, tokens: int, moves: int) -> None:
        """The stream went on on another worker after `tokens` tokens: said everywhere."""
        detail = (
            f"after {tokens} token(s) from {failure.worker_id} ({failure.cause}); "
            f"move {moves} of at most {self.cluster.migration_limit}"
        )
        log.warning(
            "worker failed mid-stream; continuing on another",
            request_id=self.request.request_id,
            detail=detail,
        )
        self._emit(
            queen_pb2.EVENT_KIND_REQUEST_MIGRATED, worker_id=failure.worker_id, detail=detail
        )
        self.cluster.history.migrated(self.request.request_id, moves)
        self.cluster.metrics.migrations.labels(self.request.model).inc()

    def ended_early(
        self,
        time_remaining: float | None,
        cut_short: str | None,
        waiting_for: str,
        stalled: str = "",
    ) -> None:
        """The call ended before the request did (unless the request was already recorded):
        record how, without awaiting."""
        if self.recorded:
            return
        status, error = endings.call_ended(time_remaining, self.attempts, self.counts.delivered)
        if cut_short is not None:
            # The server's stop ended the call, after the grace ran out on this request.
            status, error = queen_pb2.REQUEST_STATUS_FAILED, f"UNAVAILABLE: {cut_short}"
        elif stalled:
            # The client stopped reading: its own doing, like a cancel.
            status, error = queen_pb2.REQUEST_STATUS_CANCELLED, f"CANCELLED: {stalled}"
        # Named here: a done-callback runs outside the handler's bound log context.
        log.info(
            "call ended before the request", request_id=self.request.request_id,
            client_request_id=self.caller.reference, status=endings.label(status),
            waiting_for=waiting_for,
        )  # fmt: skip
        self.end(status, error, wait=False)

    async def finish(self, status: queen_pb2.RequestStatus.ValueType, error: str) -> None:
        """The request's end, its history row committed before this returns."""
        committed = self.end(status, error, wait=True)
        if committed is not None:
            # Routing never depends on the history: a disk that hangs delays the end only so long.
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(committed), COMMIT_WAIT)

    def end(
        self, status: queen_pb2.RequestStatus.ValueType, error: str, wait: bool
    ) -> asyncio.Future[None] | None:
        """The request's event, metrics and history row, the first time only; with `wait`,
        a future that settles once the row is committed."""
        if self.recorded:
            return None
        self.recorded = True
        cluster, slot, counts = self.cluster, self.slot, self.counts
        took = time.perf_counter() - self.began
        # Completed: the worker's count. Ended early: the tokens the client was sent.
        completed = status == queen_pb2.REQUEST_STATUS_COMPLETED
        tokens = counts.tokens if completed else counts.delivered_tokens
        self._emit(
            endings.event_kind(status),
            worker_id=slot.worker_id if slot else "",
            hive_id=slot.hive_id if slot else "",
            duration_seconds=took,
            detail=error,
        )
        usage = Usage(counts.prompt_tokens, counts.cached_tokens, tokens)
        code = endings.code_of(status, error)
        cluster.metrics.finished(self.request.model, code, took, counts.first_chunk_after, usage)
        return cluster.history.finish(
            self.request.request_id, status, cluster.clock.time(), tokens, error, self.attempts,
            wait=wait,
        )  # fmt: skip
