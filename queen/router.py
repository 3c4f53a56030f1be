"""The Queen service: routes each Infer to a free worker and relays its stream chunk by chunk.

Before the first chunk reaches the client a failed attempt is retried on
another worker (up to 3 attempts, backoff 0.1 s doubling, within the client's
deadline); after it, the stream ends with UNAVAILABLE saying how much was
delivered, because a second worker would repeat tokens the client already has.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from apiary.clock import Clock
from apiary.errors import StatusError
from apiary.protoutil import READY_STATES, naming, timestamp
from apiary.security import bearer
from apiary.serving import Context
from apiary.validation import infer_request_problem, name_problem
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc
from queen.autospawn import Autospawner
from queen.channels import Channels
from queen.events import EventBus
from queen.history import History
from queen.leases import DEFAULT_TTL, MAX_TTL, LeaseManager
from queen.metrics import QueenMetrics
from queen.registry import Lease, Outcome, Registry
from queen.scheduler import ModelGone, QueueFull, Scheduler

log = structlog.get_logger("queen.router")

S = common_pb2
Q = queen_pb2
MAX_ATTEMPTS = 3
RETRY_BACKOFF_SECONDS = 0.1
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
MAX_TAGS = 16


class HiveLost(Exception):
    """The worker's hive went unhealthy while we waited for the first chunk."""


class HiveWatch:
    """Lets requests waiting on a worker hear that its hive was lost."""

    def __init__(self) -> None:
        self._waiting: dict[str, dict[int, Callable[[], None]]] = {}
        self._next = 0

    def watch(self, hive_id: str, on_lost: Callable[[], None]) -> int:
        self._next += 1
        self._waiting.setdefault(hive_id, {})[self._next] = on_lost
        return self._next

    def unwatch(self, hive_id: str, key: int) -> None:
        waiting = self._waiting.get(hive_id)
        if waiting is not None:
            waiting.pop(key, None)
            if not waiting:
                del self._waiting[hive_id]

    def lost(self, hive_id: str) -> None:
        for on_lost in self._waiting.pop(hive_id, {}).values():
            on_lost()


@dataclass
class Cluster:
    """What the client-facing services share."""

    registry: Registry
    scheduler: Scheduler
    channels: Channels
    events: EventBus
    history: History
    autospawn: Autospawner
    leases: LeaseManager
    clock: Clock
    max_tokens_cap: int
    max_prompt_bytes: int
    max_streams_per_client: int
    metrics: QueenMetrics
    hive_watch: HiveWatch
    # Require a hive's id to be a name in its client certificate (mTLS).
    hive_identity_from_cert: bool = False


def tags_problem(tags: list[str]) -> str | None:
    if len(tags) > MAX_TAGS:
        return f"at most {MAX_TAGS} required tags are allowed (got {len(tags)})"
    for tag in tags:
        problem = name_problem("tag", tag)
        if problem:
            return problem
    return None


def model_problem(c: Cluster, model: str) -> StatusError | None:
    """NOT_FOUND for an unserved model (unless autospawn will); UNAVAILABLE if all failed."""
    registry = c.registry
    if not registry.has_model(model):
        if c.autospawn.can_spawn(model):
            c.autospawn.ensure(model)
            return None
        if c.registry.warming_up():
            # A queen that just (re)started has not heard every hive yet: wait for them.
            return None
        if not registry.models():
            return StatusError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {model!r}: no workers are registered yet; "
                "start one with `apiary worker spawn`",
            )
        spawnable = c.autospawn.spawnable()
        extra = f"; autospawn offers: {naming(spawnable)}" if spawnable else ""
        return StatusError(
            grpc.StatusCode.NOT_FOUND,
            f"unknown model {model!r}; models served: {naming(registry.models())}{extra}",
        )
    workers = list(registry.workers_of_model(model))
    alive = [
        w
        for w in workers
        if w.record.state != S.WORKER_STATE_FAILED or w.record.restart_in_seconds > 0
    ]
    if not alive:
        reasons = "; ".join(sorted({w.record.failure_reason or "failed" for w in workers}))
        return StatusError(
            grpc.StatusCode.UNAVAILABLE,
            f"every worker of model {model!r} has failed and none is restarting: {reasons}",
        )
    return None


class QueenService(queen_pb2_grpc.QueenServicer):
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        # Open Infer streams per client token (only when tokens are in use).
        self.streams: dict[str, int] = {}

    # ---- admission --------------------------------------------------------

    def _tags_problem(self, model: str, tags: list[str]) -> StatusError | None:
        if not tags or not self.c.registry.has_model(model):
            return None
        if self.c.registry.pool_size(model, frozenset(tags)):
            return None
        present = sorted(
            {
                ",".join(sorted(w.record.tags)) or "(none)"
                for w in self.c.registry.workers_of_model(model)
            }
        )
        return StatusError(
            grpc.StatusCode.NOT_FOUND,
            f"no worker of model {model!r} carries tags {', '.join(sorted(tags))}; "
            f"tag sets present: {naming(present)}",
        )

    def _admit(
        self, request: common_pb2.InferRequest | queen_pb2.LeaseRequest
    ) -> StatusError | None:
        tags = list(request.required_tags)
        if isinstance(request, S.InferRequest):
            problem = infer_request_problem(request, self.c.max_tokens_cap, self.c.max_prompt_bytes)
        else:
            problem = name_problem("model", request.model)
        problem = problem or tags_problem(tags)
        if not problem and request.policy not in S.RoutingPolicy.values():
            problem = f"unknown routing policy {request.policy}"
        if problem:
            return StatusError(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return model_problem(self.c, request.model) or self._tags_problem(request.model, tags)

    # ---- Infer ------------------------------------------------------------

    async def Infer(
        self, request: common_pb2.InferRequest, context: Context
    ) -> AsyncIterator[common_pb2.InferChunk]:
        request_id = request.request_id or uuid.uuid4().hex
        with structlog.contextvars.bound_contextvars(request_id=request_id, model=request.model):
            refused = self._admit(request)
            if refused is not None:
                await context.abort(refused.code, refused.message)
            if request.lease_id:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "lease_id is for calling a worker directly, not the queen",
                )
            client = bearer(context.invocation_metadata())
            limit = self.c.max_streams_per_client
            if client and limit and self.streams.get(client, 0) >= limit:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this client already has {limit} streams open (the limit per token); "
                    "wait for one to finish",
                )
            if client:
                self.streams[client] = self.streams.get(client, 0) + 1
            try:
                async for chunk in self._infer(request, request_id, context):
                    yield chunk
            finally:
                if client:
                    self.streams[client] -= 1
                    if not self.streams[client]:
                        del self.streams[client]

    async def _infer(
        self, request: common_pb2.InferRequest, request_id: str, context: Context
    ) -> AsyncIterator[common_pb2.InferChunk]:
        forward = common_pb2.InferRequest()
        forward.CopyFrom(request)
        forward.request_id = request_id
        route = _Route(self.c, forward, context)
        self.c.history.accepted(request_id, request.model, self.c.clock.time())
        self.c.events.emit(
            Q.EVENT_KIND_REQUEST_QUEUED,
            self.c.clock.time(),
            request_id=request_id,
            model=request.model,
        )
        try:
            async for chunk in route.run():
                yield chunk
        except StatusError as failed:
            await route.finish(ok=False, error=f"{failed.code.name}: {failed.message}")
            await context.abort(failed.code, failed.message)
        except asyncio.CancelledError:
            await asyncio.shield(route.finish(ok=False, error="CANCELLED: the client went away"))
            raise
        await route.finish(ok=True, error="")

    # ---- Lease ------------------------------------------------------------

    async def Lease(
        self, request: queen_pb2.LeaseRequest, context: Context
    ) -> queen_pb2.LeaseResponse:
        refused = self._admit(request)
        if refused is not None:
            await context.abort(refused.code, refused.message)
        if not 0 <= request.ttl_seconds <= MAX_TTL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"ttl_seconds must be within 0..{MAX_TTL:g}"
            )
        ttl = request.ttl_seconds or DEFAULT_TTL
        remaining = context.time_remaining()
        try:
            lease = await self.c.scheduler.acquire(
                request.model,
                remaining,
                frozenset(),
                request.policy,
                frozenset(request.required_tags),
            )
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no free worker of model {request.model!r} before the deadline",
            )
        except (QueueFull, ModelGone) as exc:
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if isinstance(exc, QueueFull)
                else grpc.StatusCode.UNAVAILABLE
            )
            await context.abort(code, str(exc))
        try:
            direct = await self.c.leases.hold(lease, ttl)
        except StatusError as exc:
            await context.abort(exc.code, str(exc))
        return Q.LeaseResponse(
            lease_id=direct.id,
            worker_id=lease.worker_id,
            address=lease.address,
            expires_at=timestamp(self.c.clock.time() + ttl),
            ttl_seconds=ttl,
        )

    async def ReleaseLease(
        self, request: queen_pb2.ReleaseLeaseRequest, context: Context
    ) -> queen_pb2.ReleaseLeaseResponse:
        if not self.c.leases.release(request.lease_id):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no active lease {request.lease_id!r} (it ended, expired or never existed)",
            )
        return Q.ReleaseLeaseResponse()

    # ---- ListModels -------------------------------------------------------

    async def ListModels(
        self, request: queen_pb2.ListModelsRequest, context: Context
    ) -> queen_pb2.ListModelsResponse:
        models = []
        registry = self.c.registry
        for name in sorted(set(registry.models()) | registry.catalog_models()):
            info = Q.ModelInfo(
                name=name,
                queued=self.c.scheduler.queue_depth(name),
                hives=sorted(h.id for h in registry.catalog_hives(name)),
            )
            for entry in registry.workers_of_model(name):
                state = entry.record.state
                if state in READY_STATES:
                    state = S.WORKER_STATE_BUSY if entry.in_flight else S.WORKER_STATE_IDLE
                if state == S.WORKER_STATE_IDLE:
                    info.idle += 1
                elif state == S.WORKER_STATE_BUSY:
                    info.busy += 1
                elif state == S.WORKER_STATE_LOADING:
                    info.loading += 1
                elif state == S.WORKER_STATE_FAILED:
                    info.failed += 1
            models.append(info)
        return Q.ListModelsResponse(models=models)


class _Route:
    """One request's way through the cluster: attempts, relay, and its record."""

    def __init__(self, c: Cluster, request: common_pb2.InferRequest, context: Context) -> None:
        self.c = c
        self.request = request
        self.context = context
        self.attempts = 0
        self.sent = 0
        self.tokens = 0
        self.lease: Lease | None = None
        self.started = time.perf_counter()
        self.first_chunk_after: float | None = None

    async def finish(self, ok: bool, error: str) -> None:
        c, rid = self.c, self.request.request_id
        kind = Q.EVENT_KIND_REQUEST_COMPLETED if ok else Q.EVENT_KIND_REQUEST_FAILED
        c.events.emit(
            kind,
            c.clock.time(),
            request_id=rid,
            model=self.request.model,
            worker_id=self.lease.worker_id if self.lease else "",
            hive_id=self.lease.hive_id if self.lease else "",
            duration_seconds=time.perf_counter() - self.started,
            detail=error,
        )
        c.metrics.finished(
            self.request.model, ok, time.perf_counter() - self.started, self.first_chunk_after,
            self.tokens,
        )  # fmt: skip
        await c.history.finished(rid, ok, c.clock.time(), self.tokens, error, self.attempts)

    async def _first(self, call: Any, lease: Lease) -> object:
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

        key = self.c.hive_watch.watch(lease.hive_id, on_lost)
        try:
            return await call.read()
        except asyncio.CancelledError:
            if not lost:
                raise  # the request itself was cancelled
            raise HiveLost(
                f"hive {lease.hive_id} of worker {lease.worker_id} stopped heartbeating "
                "before the first chunk"
            ) from None
        finally:
            self.c.hive_watch.unwatch(lease.hive_id, key)

    async def _acquire(self, deadline: float | None, tried: frozenset[str]) -> Lease:
        request = self.request
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(deadline - loop.time(), 0.0)
        try:
            return await self.c.scheduler.acquire(
                request.model, timeout, tried, request.policy, frozenset(request.required_tags)
            )
        except TimeoutError:
            raise StatusError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no free worker of model {request.model!r} before the deadline; "
                f"{self.c.scheduler.queue_depth(request.model)} other request(s) waiting",
            ) from None
        except QueueFull as exc:
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"queen queue is full: {exc}; retry later"
            ) from None
        except ModelGone as exc:
            # Unknown after all (e.g. once a restarted queen has heard every hive): say so.
            unknown = model_problem(self.c, request.model)
            raise unknown or StatusError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    async def run(self) -> AsyncIterator[common_pb2.InferChunk]:
        c, request = self.c, self.request
        loop = asyncio.get_running_loop()
        remaining = self.context.time_remaining()
        deadline = None if remaining is None else loop.time() + remaining
        tried: set[str] = set()
        last_error = ""
        for attempt in range(MAX_ATTEMPTS):
            if tried and all(
                w.record.address in tried for w in c.registry.workers_of_model(request.model)
            ):
                break  # every worker there is failed this request: say so now, not at the deadline
            lease = self.lease = await self._acquire(deadline, frozenset(tried))
            self.attempts = attempt + 1
            c.history.started(
                request.request_id, lease.worker_id, lease.hive_id, c.clock.time(), self.attempts
            )
            c.events.emit(
                Q.EVENT_KIND_REQUEST_STARTED,
                c.clock.time(),
                request_id=request.request_id,
                model=request.model,
                worker_id=lease.worker_id,
                hive_id=lease.hive_id,
            )
            began = time.perf_counter()
            outcome = Outcome(ok=None)
            timeout = None if deadline is None else max(deadline - loop.time(), 0.001)
            call = c.channels.worker(lease.address).Infer(request, timeout=timeout)
            try:
                chunk = await self._first(call, lease)
                while isinstance(chunk, common_pb2.InferChunk):
                    if self.sent == 0:
                        chunk.worker_id = lease.worker_id
                        self.first_chunk_after = time.perf_counter() - self.started
                    self.sent += 1
                    if chunk.completion_tokens:
                        self.tokens = chunk.completion_tokens
                    yield chunk
                    chunk = await call.read()
                self.tokens = self.tokens or self.sent
                outcome = Outcome(ok=True, duration=time.perf_counter() - began, tokens=self.tokens)
                return
            except HiveLost as lost:
                outcome = Outcome(ok=False, worker_fault=True)
                last_error = str(lost)
                log.warning(
                    "hive lost before first chunk; trying another", worker_id=lease.worker_id
                )
                c.metrics.failovers.labels(request.model).inc()
                tried.add(lease.address)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                fault = code in WORKER_FAULTS
                outcome = Outcome(ok=False, worker_fault=fault)
                if self.sent:
                    # Never retried: a second worker would repeat what the client already has.
                    raise StatusError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"worker {lease.worker_id} failed after {self.sent} token chunk(s) were "
                        f"delivered ({code.name}: {exc.details()}); the stream is incomplete",
                    ) from None
                if code not in RETRYABLE:
                    raise StatusError(code, exc.details() or code.name) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    outcome = Outcome(ok=None)  # a stale view of its slots, not a failure
                last_error = f"worker {lease.worker_id}: {code.name}: {exc.details()}"
                log.warning(
                    "worker failed before first chunk; trying another",
                    worker_id=lease.worker_id,
                    code=code.name,
                    attempt=attempt + 1,
                )
                c.metrics.failovers.labels(request.model).inc()
                if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # By address, not id: a worker restarted under the same id is a new
                    # process. A full worker is not excluded: it frees in a moment (our
                    # view was just ahead of it), and may be the only one there is.
                    tried.add(lease.address)
                if code == grpc.StatusCode.UNAVAILABLE:
                    c.registry.mark_unreachable(lease.worker_id)
            finally:
                if not call.done():
                    call.cancel()
                c.scheduler.release(lease, outcome)
            backoff = RETRY_BACKOFF_SECONDS * 2**attempt
            if attempt + 1 == MAX_ATTEMPTS or (
                deadline is not None and loop.time() + backoff >= deadline
            ):
                break
            await asyncio.sleep(backoff)
        raise StatusError(
            grpc.StatusCode.UNAVAILABLE,
            f"no worker of model {request.model!r} could serve the request after "
            f"{self.attempts} attempt(s); last error: {last_error}",
        )
