"""One request's way through the cluster: a slot from the desk, an attempt, the relay of its
chunks, and on failure what queen/requests/retry.py decides. What is said of it (history,
events, metrics) is its RequestRecord's (queen/requests/record.py).

The record's end is made exactly once, however the request ends: completed, failed with a
status, or cut short by its call (cancelled, deadline passed; queen/requests/endings.py says
which). grpc.aio ends a handler's generator in two ways when the call goes: CancelledError
where it awaits (the worker's next chunk, a free slot), or, when it was suspended at a yield
(sending to the client), by dropping it, which closes it with GeneratorExit; and it calls the
call's done-callbacks. Every one of these paths records without awaiting (`ended()`).

A stopping queen ends requests too (queen/server.py says when): waits for a slot end at once
(the desk's stop), and streams still running when its grace runs out are cut (`Route.cut`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from typing import Any, Protocol

import grpc
import structlog

from apiary.coalesce import coalesced
from apiary.errors import StatusError
from protos.v1 import common_pb2, queen_pb2
from queen import stopping
from queen.cluster import Cluster, HiveLost
from queen.members import GENERATE_TAG
from queen.requests import endings, retry
from queen.requests.progress import Progress
from queen.requests.record import Caller, RequestRecord
from queen.requests.retry import Decision, Failure, failure_of
from queen.routing.ask import Ask, Outcome, Slot
from queen.routing.prefix_index import Want

log = structlog.get_logger("queen.requests.route")


class Call(Protocol):
    """What a route needs of the call that brought its request (a gRPC context, an HTTP
    request): the seconds its client still waits (None: no deadline)."""

    def time_remaining(self) -> float | None: ...


class Route:
    """Carries out one request's attempts; the decisions are queen/requests/retry.py's."""

    def __init__(
        self, cluster: Cluster, request: common_pb2.InferRequest, context: Call, caller: Caller
    ) -> None:
        self.cluster = cluster
        # As the workers get it: request_id is the queen's own id.
        self.request = request
        self.context = context
        self.record = RequestRecord(cluster, request, caller)
        self.ask = Ask(request.model, frozenset([*request.required_tags, GENERATE_TAG]),
                       request.policy, Want(request, request.session_id))  # fmt: skip
        # The slot and worker call this route still holds, given back exactly once (_let_go).
        self._held: Slot | None = None
        self._call: Any = None
        # Suspended at a yield: grpc.aio is sending a chunk to the client (else we await).
        self.sending = False
        # Set once a stopping queen's grace ran out with this request still going: why it ends.
        self.cut_short: str | None = None
        # Set when the client took nothing of its stream for too long: why it was cut.
        self.stall = ""
        # The completion's token ids so far, so a failed worker's stream can go on elsewhere;
        # what the next attempt sends (the request, or its continuation after a move); the
        # failure a move is pending for (None once a worker took the continuation).
        self.progress = Progress.of(request)
        self.to_send = request
        self.stranded: Failure | None = None

    async def serve(self) -> AsyncGenerator[common_pb2.InferChunk, None]:
        """The request from its acceptance to its record: its chunks (each carrying the
        client's reference, else the queen's id, and numbered across moves), or StatusError."""
        record = self.record
        record.accepted()
        echo = record.caller.reference or self.request.request_id
        try:
            async with aclosing(self.run()) as chunks:
                index = 0  # numbered here, not per attempt: a stream that moved stays consecutive
                async for chunk in chunks:
                    chunk.request_id, chunk.index = echo, index
                    index += 1
                    self.sending = True
                    yield chunk
                    self.sending = False
                    record.delivered(chunk)
        except StatusError as failed:
            status = endings.status_of_error(failed.code.name)
            await record.finish(status, f"{failed.code.name}: {failed.message}")
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # The call is over: record without awaiting (nobody may drive a closing generator).
            self.ended()
            raise
        except Exception as exc:
            await record.finish(queen_pb2.REQUEST_STATUS_FAILED, f"INTERNAL: queen error: {exc}")
            raise
        await record.finish(queen_pb2.REQUEST_STATUS_COMPLETED, "")

    async def run(self) -> AsyncGenerator[common_pb2.InferChunk, None]:
        """The chunks of the first attempt that gets going; StatusError if none does."""
        loop, counts = asyncio.get_running_loop(), self.record.counts
        # The client's deadline, on the event loop's clock (as gRPC keeps it).
        remaining = self.context.time_remaining()
        deadline = None if remaining is None else loop.time() + remaining
        last_error = ""
        while not retry.every_worker_tried(self.ask.exclude, self._addresses()):
            slot = self._held = await self._take_slot(deadline)
            self.record.started(slot)
            if self.stranded is not None:  # said once it happens: a worker took it
                moved = len(self.progress.token_ids) - len(self.request.continuation.token_ids)
                self.record.migrated(self.stranded, moved, self.progress.moves)
                self.stranded = None
            began, outcome = time.perf_counter(), Outcome(ok=None)
            timeout = None if deadline is None else max(deadline - loop.time(), 0.001)
            call = self._call = self.cluster.channels.worker(slot.address).Infer(
                self.to_send, timeout=timeout
            )
            try:
                async with aclosing(coalesced(self._from_worker(call, slot))) as chunks:
                    async for chunk in chunks:
                        yield chunk
                counts.tokens = counts.tokens or counts.sent
                outcome = Outcome(True, time.perf_counter() - began, counts.tokens)
                return
            except (HiveLost, grpc.aio.AioRpcError) as exc:
                failure = failure_of(exc, slot)
                decision = self._decide(failure, deadline)
                outcome = decision.outcome
                # Before the slot goes back: a waiter must not get a worker we cannot reach.
                self._note_failure(failure, decision)
            finally:
                self._let_go(outcome)
            if decision.error is not None:
                raise decision.error
            last_error = decision.last_error
            await self.cluster.clock.sleep(decision.backoff)
        if self.stranded is not None:
            why = f"no other worker of model {self.request.model!r} is left to continue it"
            raise retry.stranded(self.stranded, counts.sent, why)
        raise retry.gave_up(self.request.model, self.record.attempts, last_error)

    async def _take_slot(self, deadline: float | None) -> Slot:
        loop = asyncio.get_running_loop()
        remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
        return await self.cluster.desk.take(self.record.caller.client, self.ask, remaining)

    def _decide(self, failure: Failure, deadline: float | None) -> Decision:
        time_left = None if deadline is None else deadline - asyncio.get_running_loop().time()
        request, limit = self.request, self.cluster.migration_limit
        movable = self.progress.movable(request.max_tokens, limit)
        stuck = "" if movable else self.progress.why_not(request.max_tokens, limit)
        attempts, sent = self.record.attempts, self.record.counts.sent
        decision = retry.decide(failure, attempts, sent, time_left, request.model, movable, stuck)
        if decision.migrate:
            self.to_send = self.progress.continued(request)
            self.stranded = failure
        return decision

    def _note_failure(self, failure: Failure, decision: Decision) -> None:
        """The decision's side effects on this request and on the registry."""
        if decision.failover:
            self.record.failed_over(failure)
        if decision.exclude:
            self.ask = self.ask.excluding(decision.exclude)
        if decision.mark_unreachable:
            self.cluster.registry.mark_unreachable(failure.worker_id)

    def _let_go(self, outcome: Outcome) -> None:
        """End the worker call and give the slot back, once, whoever gets here first."""
        call, self._call = self._call, None
        if call is not None and not call.done():
            call.cancel()
        slot, self._held = self._held, None
        if slot is not None:
            self.cluster.desk.give_back(slot, outcome)

    def _addresses(self) -> Iterator[str]:
        """Lazily: only read once an attempt failed, and only up to a worker not yet tried."""
        for entry in self.cluster.registry.workers_of_model(self.request.model):
            yield entry.record.address

    async def _from_worker(
        self, call: Any, slot: Slot
    ) -> AsyncGenerator[common_pb2.InferChunk, None]:
        """The worker's chunks as they come, counted; the first names the worker. They are
        read ahead while the client is sent the previous message (apiary/coalesce.py)."""
        chunk = await self.cluster.hive_watch.first(slot.hive_id, slot.worker_id, call, self._read)
        if isinstance(chunk, common_pb2.InferChunk):
            chunk.worker_id = slot.worker_id  # after a move too: the client sees it
        while isinstance(chunk, common_pb2.InferChunk):
            self.record.chunk(chunk)
            self.progress.add(chunk)
            yield chunk
            chunk = await self._read(call)

    def cut(self, grace: float) -> None:
        """The stopping queen's grace ran out: end the request with UNAVAILABLE saying so.
        Cancelling the worker call wakes a relay waiting on it (see _read); a handler stuck
        sending to its client is ended by the server's stop, and ended() records the cut."""
        self.cut_short = stopping.cut_by_shutdown(
            grace, self.record.attempts, self.record.counts.delivered
        )
        call = self._call
        if call is not None and not call.done():
            call.cancel()

    async def _read(self, call: Any) -> object:
        """The worker's next chunk (or EOF); StatusError UNAVAILABLE once the route is cut."""
        try:
            return await call.read()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.cut_short is None or (task is not None and task.cancelling()):
                raise  # not cut, or the call itself is over: the client left
            raise stopping.status(self.cut_short) from None

    def stalled(self, why: str) -> None:
        """The client took nothing of its stream for too long: it is cut, and recorded so."""
        self.stall = why

    def ended(self) -> None:
        """The call ended before the request did: record how (unless the request was already
        recorded) and give back the slot and the worker call. Awaits nothing, so a done-callback
        or a generator closed with GeneratorExit can call it; calling it again does nothing."""
        waiting_for = "the client" if self.sending else "a worker or a slot"
        self.record.ended_early(
            self.context.time_remaining(), self.cut_short, waiting_for, self.stall
        )
        self._let_go(Outcome(ok=None))
