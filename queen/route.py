"""One request's way through the cluster: a slot, an attempt, the relay of its chunks, and on
failure what queen/retry.py decides; then the request's record (history, events, metrics)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import grpc
import structlog

from apiary.errors import StatusError
from apiary.serving import Context
from protos.v1 import common_pb2, queen_pb2
from queen import retry
from queen.admission import model_problem
from queen.cluster import Cluster
from queen.registry import Outcome, Slot
from queen.retry import Decision, Failure
from queen.scheduler import ModelGone, QueueFull

log = structlog.get_logger("queen.route")


class HiveLost(Exception):
    """The worker's hive went unhealthy while we waited for the first chunk."""


class Route:
    """Carries out one request's attempts; the decisions are queen/retry.py's."""

    def __init__(
        self, cluster: Cluster, request: common_pb2.InferRequest, context: Context
    ) -> None:
        self.cluster = cluster
        self.request = request
        self.context = context
        self.attempts = 0
        self.sent = 0
        self.tokens = 0
        self.slot: Slot | None = None
        self.started = time.perf_counter()
        self.first_chunk_after: float | None = None

    async def run(self) -> AsyncIterator[common_pb2.InferChunk]:
        """The chunks of the first attempt that gets going; StatusError if none does."""
        cluster, request = self.cluster, self.request
        loop = asyncio.get_running_loop()
        # The client's deadline, on the event loop's clock (as gRPC keeps it).
        remaining = self.context.time_remaining()
        deadline = None if remaining is None else loop.time() + remaining
        tried: set[str] = set()
        last_error = ""
        while not retry.every_worker_tried(tried, self._addresses()):
            slot = self.slot = await self._take_slot(deadline, frozenset(tried))
            self._started(slot)
            began = time.perf_counter()
            outcome = Outcome(ok=None)
            timeout = None if deadline is None else max(deadline - loop.time(), 0.001)
            call = cluster.channels.worker(slot.address).Infer(request, timeout=timeout)
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
                decision = retry.decide(failure, self.attempts, self.sent, time_left, request.model)
                outcome = decision.outcome
                # Before the slot goes back: a waiter must not get a worker we cannot reach.
                self._note_failure(failure, decision, tried)
            finally:
                if not call.done():
                    call.cancel()
                cluster.scheduler.give_back(slot, outcome)
            if decision.error is not None:
                raise decision.error
            last_error = decision.last_error
            await cluster.clock.sleep(decision.backoff)
        raise retry.gave_up(request.model, self.attempts, last_error)

    def _addresses(self) -> Iterator[str]:
        """Lazily: only read once an attempt failed, and only up to a worker not yet tried."""
        for entry in self.cluster.registry.workers_of_model(self.request.model):
            yield entry.record.address

    def _started(self, slot: Slot) -> None:
        cluster, request = self.cluster, self.request
        self.attempts += 1
        cluster.history.started(
            request.request_id, slot.worker_id, slot.hive_id, cluster.clock.time(), self.attempts
        )
        cluster.events.emit(
            queen_pb2.EVENT_KIND_REQUEST_STARTED,
            cluster.clock.time(),
            request_id=request.request_id,
            model=request.model,
            worker_id=slot.worker_id,
            hive_id=slot.hive_id,
        )

    async def _relay(self, call: Any, slot: Slot) -> AsyncGenerator[common_pb2.InferChunk, None]:
        """The worker's chunks as they come, counted; the first names the worker."""
        chunk = await self._first(call, slot)
        while isinstance(chunk, common_pb2.InferChunk):
            if self.sent == 0:
                chunk.worker_id = slot.worker_id
                self.first_chunk_after = time.perf_counter() - self.started
            self.sent += 1
            if chunk.completion_tokens:
                self.tokens = chunk.completion_tokens
            yield chunk
            chunk = await call.read()

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
            return await call.read()
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
            return await scheduler.take_slot(
                request.model, timeout, tried, request.policy, frozenset(request.required_tags)
            )
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

    async def finish(self, ok: bool, error: str) -> None:
        """The request's record: its event, metrics and history row."""
        cluster, request_id = self.cluster, self.request.request_id
        slot = self.slot
        kind = queen_pb2.EVENT_KIND_REQUEST_COMPLETED if ok else queen_pb2.EVENT_KIND_REQUEST_FAILED
        cluster.events.emit(
            kind,
            cluster.clock.time(),
            request_id=request_id,
            model=self.request.model,
            worker_id=slot.worker_id if slot else "",
            hive_id=slot.hive_id if slot else "",
            duration_seconds=time.perf_counter() - self.started,
            detail=error,
        )
        cluster.metrics.finished(
            self.request.model, ok, time.perf_counter() - self.started, self.first_chunk_after,
            self.tokens,
        )  # fmt: skip
        await cluster.history.finished(
            request_id, ok, cluster.clock.time(), self.tokens, error, self.attempts
        )


def failure_of(exc: Exception, slot: Slot) -> Failure:
    """The attempt's failure as retry.decide takes it."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return Failure(slot.worker_id, slot.address, exc.code(), exc.details())
    return Failure(slot.worker_id, slot.address, None, str(exc))
