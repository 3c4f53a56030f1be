"""One request's way through the cluster: a slot, an attempt, the relay of its chunks, and on
failure what queen/requests/retry.py decides; then the request's record (history, events, metrics).

The record is made exactly once, however the request ends: completed, failed with a status,
or cut short by its call (cancelled, deadline passed; queen/requests/endings.py says which). grpc.aio
ends a handler's generator in two ways when the call goes: CancelledError where it awaits
(the worker's next chunk, a free slot), or, when it was suspended at a yield (sending to the
client), by dropping it, which closes it with GeneratorExit; and it calls the call's
done-callbacks. Every one of these paths records without awaiting (`ended()`).

A stopping queen ends requests too (queen/server.py says when): waits for a slot end at once
(`Waits.stop`), and streams still running when its grace runs out are cut (`Route.cut`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import structlog

from apiary.coalesce import coalesced
from apiary.errors import StatusError
from protos.v1 import common_pb2, queen_pb2
from queen.requests import endings
from queen.requests import retry
from queen.requests.admission import model_problem
from queen.cluster import Cluster
from queen.metrics import Usage
from queen.routing.prefix_index import Want
from queen.requests.progress import Progress
from queen.requests.quotas import Quota
from queen.registry import Outcome, Slot
from queen.requests.retry import Decision, Failure
from queen.routing.desk import ModelGone, QueueFull

log = structlog.get_logger("queen.requests.route")

# The longest a stream's end waits for its history row to be committed (normally well under a
# millisecond); past it the stream ends all the same.
COMMIT_WAIT = 5.0


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the client (its token's name, or its host without tokens) and the
    client's own reference for it (its request_id, or '')."""

    client: str = ""
    reference: str = ""


class Stopping(Exception):
    """The queen is shutting down: no wait for a slot begins, and every wait ends."""


@dataclass(eq=False)
class Waits:
    """Every wait for a slot (an Infer's attempts, a Lease): counted against the client's
    quota of waiting requests, at most --max-wait long, and ended when the queen stops."""

    cluster: Cluster
    queued: Quota = field(default_factory=lambda: Quota("requests waiting", "", 0, ""))
    max_wait: float = endings.DEFAULT_MAX_WAIT
    stopping: bool = False
    # Models being waited for, with how many waits each, so stop() can end them all.
    _models: Tally[str] = field(default_factory=Tally)

    async def slot(
        self,
        client: str,
        model: str,
        time_remaining: float | None,
        exclude: frozenset[str] = frozenset(),
        policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED,
        tags: frozenset[str] = frozenset(),
        want: Want | None = None,
    ) -> Slot:
        """A slot for one of `client`'s requests, waiting until its deadline (`time_remaining`
        seconds; None: none) but at most --max-wait. Raises Stopping; StatusError
        RESOURCE_EXHAUSTED beyond the client's waits, DEADLINE_EXCEEDED after --max-wait;
        otherwise what Scheduler.take_slot raises (TimeoutError: the client's deadline)."""
        if self.stopping:
            raise Stopping()
        scheduler = self.cluster.scheduler
        slot = scheduler.try_take_slot(model, exclude, policy, tags, want)
        if slot is not None:
            self.cluster.metrics.queue_wait.labels(model).observe(0.0)
            return slot
        began = time.perf_counter()
        refused = self.queued.acquire(client)
        if refused is not None:
            raise StatusError(grpc.StatusCode[refused.code], refused.message)
        timeout, capped = endings.slot_wait(time_remaining, self.max_wait)
        self._models[model] += 1
        try:
            slot = await scheduler.take_slot(model, timeout, exclude, policy, tags, want)
            waited = time.perf_counter() - began
            self.cluster.metrics.queue_wait.labels(model).observe(waited)
            return slot
        except TimeoutError:
            if not capped:
                raise
            others = scheduler.queue_depth(model)
            message = endings.waited_too_long(model, self.max_wait, others)
            raise StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, message) from None
        except ModelGone:
            if self.stopping:
                raise Stopping() from None
            raise
        finally:
            self.queued.release(client)
            self._models[model] -= 1
            if not self._models[model]:
                del self._models[model]

    def stop(self) -> None:
        """The queen is shutting down: every wait ends (Stopping) and none begins."""
        self.stopping = True
        for model in list(self._models):
            self.cluster.scheduler.fail(model, endings.ended_while_waiting())


class InFlight:
    """The routes whose calls are not over, so a stopping queen can wait for them to finish
    and cut the rest."""

    def __init__(self) -> None:
        self.routes: set[Route] = set()
        self._none = asyncio.Event()
        self._none.set()

    def __len__(self) -> int:
        return len(self.routes)

    def add(self, route: Route) -> None:
        self.routes.add(route)
        self._none.clear()

    def discard(self, route: Route) -> None:
        self.routes.discard(route)
        if not self.routes:
            self._none.set()

    async def finished(self, timeout: float, hurry: asyncio.Event | None = None) -> bool:
        """Whether every route ended within `timeout` seconds (or before `hurry` was set)."""
        waits = [asyncio.ensure_future(self._none.wait())]
        if hurry is not None:
            waits.append(asyncio.ensure_future(hurry.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return not self.routes

    def cut(self, grace: float) -> int:
        """End every route still in flight (see Route.cut); how many there were."""
        routes = list(self.routes)
        for route in routes:
            route.cut(grace)
        return len(routes)


class Call(Protocol):
    """What a route needs of the call that brought its request (a gRPC context, an HTTP
    request): the seconds its client still waits (None: no deadline)."""

    def time_remaining(self) -> float | None: ...


class HiveLost(Exception):
    """The worker's hive went unhealthy while we waited for the first chunk."""


class Route:
    """Carries out one request's attempts; the decisions are queen/requests/retry.py's."""

    def __init__(
        self,
        cluster: Cluster,
        request: common_pb2.InferRequest,
        context: Call,
        caller: Caller = Caller(),
        waits: Waits | None = None,
    ) -> None:
        self.cluster = cluster
        # As the workers get it: request_id is the queen's own id.
        self.request = request
        self.context = context
        self.caller = caller
        self.waits = waits or Waits(cluster)
        self.attempts = 0
        # Chunks read from workers; messages with text that reached the client (their yield
        # returned, so grpc.aio has sent them: several chunks may go as one); the worker's own
        # count of tokens, once it says it.
        self.sent = 0
        self.delivered = 0
        self.delivered_tokens = 0
        self.tokens = 0
        # The prompt's tokens and how many a worker had cached, once the worker says so.
        self.prompt_tokens = 0
        self.cached_tokens = 0
        # The current (or last) attempt's slot, kept for the record; the slot and worker call
        # this route still holds, given back exactly once (`_let_go`).
        self.slot: Slot | None = None
        self._held: Slot | None = None
        self._call: Any = None
        self.recorded = False
        # Suspended at a yield: grpc.aio is sending a chunk to the client (else we await).
        self.sending = False
        self.started = time.perf_counter()
        self.first_chunk_after: float | None = None
        # Set once a stopping queen's grace ran out with this request still going: why it ends.
        self.cut_short: str | None = None
        # What a cache-aware pick reads (the prompt's prefix hashes are made only if needed).
        self.want = Want(request, request.session_id)
        # The completion's token ids so far, so a failed worker's stream can go on elsewhere;
        # what the next attempt sends (the request, or its continuation after a move).
        self.progress = Progress.of(request)
        self.to_send = request
        self.messages = 0
        # The failure a move is pending for (None once a worker took the continuation).
        self.stranded: Failure | None = None

    async def serve(self) -> AsyncGenerator[common_pb2.InferChunk, None]:
        """The request from its acceptance to its record: its chunks (each carrying the
        client's reference, else the queen's id), or StatusError."""
        self._accepted()
        echo = self.caller.reference or self.request.request_id
        try:
            async with aclosing(self.run()) as chunks:
                async for chunk in chunks:
                    chunk.request_id = echo
                    # Numbered here, not per attempt: a stream that moved stays consecutive.
                    chunk.index = self.messages
                    self.messages += 1
                    self.sending = True
                    yield chunk
                    self.sending = False
                    if chunk.text:
                        self.delivered += 1
                        self.delivered_tokens += len(chunk.token_ids) or 1
        except StatusError as failed:
            status = endings.status_of_error(failed.code.name)
            await self.finish(status, f"{failed.code.name}: {failed.message}")
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # The call is over: record without awaiting (nobody may drive a closing generator).
            self.ended()
            raise
        except Exception as exc:
            await self.finish(queen_pb2.REQUEST_STATUS_FAILED, f"INTERNAL: queen error: {exc}")
            raise
        await self.finish(queen_pb2.REQUEST_STATUS_COMPLETED, "")

    async def run(self) -> AsyncGenerator[common_pb2.InferChunk, None]:
        """The chunks of the first attempt that gets going; StatusError if none does."""
        cluster, request = self.cluster, self.request
        loop = asyncio.get_running_loop()
        # The client's deadline, on the event loop's clock (as gRPC keeps it).
        remaining = self.context.time_remaining()
        deadline = None if remaining is None else loop.time() + remaining
        tried: set[str] = set()
        last_error = ""
        while not retry.every_worker_tried(tried, self._addresses()):
            slot = self.slot = self._held = await self._take_slot(deadline, frozenset(tried))
            self._started(slot)
            if self.stranded is not None:
                self._migrated(self.stranded)  # said once it happens: a worker took it
            began = time.perf_counter()
            outcome = Outcome(ok=None)
            timeout = None if deadline is None else max(deadline - loop.time(), 0.001)
            worker = cluster.channels.worker(slot.address)
            call = self._call = worker.Infer(self.to_send, timeout=timeout)
            try:
                async with aclosing(self._relay(call, slot)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                self.tokens = self.tokens or self.sent
                outcome = Outcome(ok=True, duration=time.perf_counter() - began, tokens=self.tokens)
                return
            except (HiveLost, grpc.aio.AioRpcError) as exc:
                failure = failure_of(exc, slot)
                time_left = None if deadline is None else deadline - loop.time()
                decision = self._decide(failure, time_left)
                outcome = decision.outcome
                # Before the slot goes back: a waiter must not get a worker we cannot reach.
                self._note_failure(failure, decision, tried)
            finally:
                self._let_go(outcome)
            if decision.error is not None:
                raise decision.error
            last_error = decision.last_error
            await cluster.clock.sleep(decision.backoff)
        if self.stranded is not None:
            why = f"no other worker of model {request.model!r} is left to continue it"
            raise retry.stranded(self.stranded, self.sent, why)
        raise retry.gave_up(request.model, self.attempts, last_error)

    def _decide(self, failure: Failure, time_left: float | None) -> Decision:
        request, limit = self.request, self.cluster.migration_limit
        movable = self.progress.movable(request.max_tokens, limit)
        stuck = "" if movable else self.progress.why_not(request.max_tokens, limit)
        decision = retry.decide(
            failure, self.attempts, self.sent, time_left, request.model, movable, stuck
        )
        if decision.migrate:
            self.to_send = self.progress.continued(request)
            self.stranded = failure
        return decision

    def _migrated(self, failure: Failure) -> None:
        """Said everywhere: log, event, history, metric."""
        delivered = len(self.progress.token_ids) - len(self.request.continuation.token_ids)
        detail = (
            f"after {delivered} token(s) from {failure.worker_id} ({failure.cause}); "
            f"move {self.progress.moves} of at most {self.cluster.migration_limit}"
        )
        log.warning(
            "worker failed mid-stream; continuing on another",
            request_id=self.request.request_id,
            detail=detail,
        )
        self._emit(
            queen_pb2.EVENT_KIND_REQUEST_MIGRATED, worker_id=failure.worker_id, detail=detail
        )
        self.cluster.history.migrated(self.request.request_id, self.progress.moves)
        self.cluster.metrics.migrations.labels(self.request.model).inc()
        self.stranded = None

    def _let_go(self, outcome: Outcome) -> None:
        """End the worker call and give the slot back, once, whoever gets here first."""
        call, self._call = self._call, None
        if call is not None and not call.done():
            call.cancel()
        slot, self._held = self._held, None
        if slot is not None:
            self.cluster.scheduler.give_back(slot, outcome)

    def _addresses(self) -> Iterator[str]:
        """Lazily: only read once an attempt failed, and only up to a worker not yet tried."""
        for entry in self.cluster.registry.workers_of_model(self.request.model):
            yield entry.record.address

    def _emit(self, kind: queen_pb2.EventKind.ValueType, **fields: object) -> None:
        self.cluster.events.emit(
            kind,
            self.cluster.clock.time(),
            request_id=self.request.request_id,
            client_request_id=self.caller.reference,
            model=self.request.model,
            **fields,
        )

    def _accepted(self) -> None:
        cluster, request, caller = self.cluster, self.request, self.caller
        cluster.history.accepted(
            request.request_id, request.model, cluster.clock.time(), caller.client, caller.reference
        )
        self._emit(queen_pb2.EVENT_KIND_REQUEST_QUEUED)

    def _started(self, slot: Slot) -> None:
        cluster, request = self.cluster, self.request
        self.attempts += 1
        policy = cluster.registry.policy_for(request.model, request.policy)
        cluster.history.started(
            request.request_id, slot.worker_id, slot.hive_id, cluster.clock.time(), self.attempts,
            policy,
        )  # fmt: skip
        self._emit(
            queen_pb2.EVENT_KIND_REQUEST_STARTED, worker_id=slot.worker_id, hive_id=slot.hive_id
        )

    async def _relay(self, call: Any, slot: Slot) -> AsyncGenerator[common_pb2.InferChunk, None]:
        """The worker's chunks for the client: read ahead while the client is being sent the
        previous message, and what piled up meanwhile sent as one (apiary/coalesce.py); a
        chunk that finds the client ready goes at once, alone."""
        async with aclosing(coalesced(self._from_worker(call, slot))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _from_worker(
        self, call: Any, slot: Slot
    ) -> AsyncGenerator[common_pb2.InferChunk, None]:
        """The worker's chunks as they come, counted; the first names the worker."""
        chunk = await self._first(call, slot)
        if isinstance(chunk, common_pb2.InferChunk):
            chunk.worker_id = slot.worker_id  # after a move too: the client sees it
        while isinstance(chunk, common_pb2.InferChunk):
            if self.sent == 0:
                self.first_chunk_after = time.perf_counter() - self.started
            self.sent += 1
            self.progress.add(chunk)
            if chunk.completion_tokens:
                self.tokens = chunk.completion_tokens
            if chunk.prompt_tokens:
                self.prompt_tokens = chunk.prompt_tokens
                self.cached_tokens = chunk.cached_prompt_tokens
            yield chunk
            chunk = await self._read(call)

    def _note_failure(self, failure: Failure, decision: Decision, tried: set[str]) -> None:
        """The decision's side effects on this request and on the registry."""
        if decision.failover:
            if failure.code is None:
                log.warning(
                    "hive lost before first chunk; trying another", worker_id=failure.worker_id
                )
            else:
                log.warning(
                    "worker failed before first chunk; trying another",
                    worker_id=failure.worker_id,
                    code=failure.code.name,
                    attempt=self.attempts,
                )
            self.cluster.metrics.failovers.labels(self.request.model).inc()
        if decision.exclude:
            tried.add(decision.exclude)
        if decision.mark_unreachable:
            self.cluster.registry.mark_unreachable(failure.worker_id)

    async def _first(self, call: Any, slot: Slot) -> object:
        """The first chunk (or EOF); HiveLost if the worker's hive goes unhealthy first.

        A worker cut off with its hive (a network partition) sends no error, just nothing;
        waiting for TCP or keepalive to say so would stall the request for many seconds, while
        the queen knows within 3 heartbeat intervals. Nothing has reached the client yet, so
        the request can safely move to another worker.
        """
        lost = False

        def on_lost() -> None:
            nonlocal lost
            lost = True
            call.cancel()  # wakes the read below with CancelledError

        key = self.cluster.hive_watch.watch(slot.hive_id, on_lost)
        try:
            return await self._read(call)
        except asyncio.CancelledError:
            if not lost:
                raise  # the request itself was cancelled
            raise HiveLost(
                f"hive {slot.hive_id} of worker {slot.worker_id} stopped heartbeating "
                "before the first chunk"
            ) from None
        finally:
            self.cluster.hive_watch.unwatch(slot.hive_id, key)

    async def _take_slot(self, deadline: float | None, tried: frozenset[str]) -> Slot:
        request = self.request
        scheduler = self.cluster.scheduler
        timeout = (
            None if deadline is None else max(deadline - asyncio.get_running_loop().time(), 0.0)
        )
        try:
            return await self.waits.slot(
                self.caller.client, request.model, timeout, tried, request.policy,
                frozenset(request.required_tags), self.want,
            )  # fmt: skip
        except Stopping:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, endings.ended_while_waiting()) from None
        except TimeoutError:
            raise StatusError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no free worker of model {request.model!r} before the deadline; "
                f"{scheduler.queue_depth(request.model)} other request(s) waiting",
            ) from None
        except QueueFull as exc:
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"queen queue is full: {exc}; retry later"
            ) from None
        except ModelGone as exc:
            # Unknown after all (e.g. once a restarted queen has heard every hive): say so.
            unknown = model_problem(self.cluster, request.model)
            raise unknown or StatusError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    def cut(self, grace: float) -> None:
        """The stopping queen's grace ran out: end the request with UNAVAILABLE saying so.
        Cancelling the worker call wakes a relay waiting on it (see _read); a handler stuck
        sending to its client is ended by the server's stop, and ended() records the cut."""
        self.cut_short = endings.cut_by_shutdown(grace, self.attempts, self.delivered)
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
            raise StatusError(grpc.StatusCode.UNAVAILABLE, self.cut_short) from None

    async def finish(self, status: queen_pb2.RequestStatus.ValueType, error: str) -> None:
        """The request's record, its history row committed before this returns."""
        committed = self.record(status, error, wait=True)
        if committed is not None:
            # Routing never depends on the history: a disk that hangs delays the end only so long.
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(committed), COMMIT_WAIT)

    def ended(self) -> None:
        """The call ended before the request did: record how (unless the request was already
        recorded) and give back the slot and the worker call. Awaits nothing, so a done-callback
        or a generator closed with GeneratorExit can call it; calling it again does nothing."""
        if not self.recorded:
            status, error = endings.call_ended(
                self.context.time_remaining(), self.attempts, self.delivered
            )
            if self.cut_short is not None:
                # The server's stop ended the call, after the grace ran out on this request.
                status, error = queen_pb2.REQUEST_STATUS_FAILED, f"UNAVAILABLE: {self.cut_short}"
            # Named here: a done-callback runs outside the handler's bound log context.
            log.info(
                "call ended before the request",
                request_id=self.request.request_id,
                client_request_id=self.caller.reference,
                status=endings.label(status),
                waiting_for="the client" if self.sending else "a worker or a slot",
            )
            self.record(status, error, wait=False)
        self._let_go(Outcome(ok=None))

    def record(
        self, status: queen_pb2.RequestStatus.ValueType, error: str, wait: bool
    ) -> asyncio.Future[None] | None:
        """The request's event, metrics and history row, the first time only; with `wait`,
        a future that settles once the row is committed."""
        if self.recorded:
            return None
        self.recorded = True
        cluster, slot = self.cluster, self.slot
        took = time.perf_counter() - self.started
        # Completed: the worker's count. Ended early: the tokens the client was sent.
        tokens = (
            self.tokens if status == queen_pb2.REQUEST_STATUS_COMPLETED else self.delivered_tokens
        )
        self._emit(
            endings.event_kind(status),
            worker_id=slot.worker_id if slot else "",
            hive_id=slot.hive_id if slot else "",
            duration_seconds=took,
            detail=error,
        )
        usage = Usage(self.prompt_tokens, self.cached_tokens, tokens)
        code = endings.code_of(status, error)
        cluster.metrics.finished(self.request.model, code, took, self.first_chunk_after, usage)
        return cluster.history.finish(
            self.request.request_id, status, cluster.clock.time(), tokens, error, self.attempts,
            wait=wait,
        )  # fmt: skip


def failure_of(exc: Exception, slot: Slot) -> Failure:
    """The attempt's failure as retry.decide takes it."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return Failure(slot.worker_id, slot.address, exc.code(), exc.details())
    return Failure(slot.worker_id, slot.address, None, str(exc))
