"""The worker's gRPC server: enforces its own slots and streams its backend's tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog

from apiary.clock import Clock, SystemClock
from apiary.coalesce import coalesced
from apiary.leasetoken import LeaseToken, lease_id_of
from apiary.protoutil import timestamp
from apiary.security import OPEN, Security, TokenSet, bearer, method_table
from apiary.serving import Context, RunningServer, start_server
from apiary.validation import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_MAX_TOKENS_CAP,
    embed_request_problem,
    grace_problem,
    infer_request_problem,
)
from protos.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.backends import Backend, RequestRefused
from worker.leases import LeaseDesk
from worker.slots import Slots
from worker.stream import Prepared, render, stream

log = structlog.get_logger("worker.server")

SERVICE_NAMES = (worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,)


@dataclass
class WorkerIdentity:
    """Who this worker is, as its hive named it at spawn."""

    worker_id: str
    hive_id: str
    model: str
    backend: str
    device: str
    slots: int
    backend_options: dict[str, str] = field(default_factory=dict)


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        identity: WorkerIdentity,
        backend: Backend,
        max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
        stop: asyncio.Event | None = None,
        stop_grace: float = 5.0,
        tokens: TokenSet | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.tokens = tokens or TokenSet()
        self.clock = clock or SystemClock()
        # When the hive last asked after us (GetStatus, each health interval): a worker that
        # stops hearing from its hive is an orphan (worker/orphans.py).
        self.heard_from_hive = self.clock.monotonic()
        self.identity = identity
        # Set by Shutdown (or a signal): the worker's main loop then drains and exits.
        self.stop = stop or asyncio.Event()
        self.stop_grace = stop_grace
        self.backend = backend
        self.max_tokens_cap = max_tokens_cap
        self.ready = False
        self.load_progress = 0.0
        self.status_detail = "starting"
        self.slots = Slots(identity.worker_id, identity.slots)
        self.leases = LeaseDesk(identity.worker_id, self.tokens.worker, self.slots, self.clock)
        self.completed = 0
        self.failed = 0
        self.started_at = time.time()
        self.last_activity = 0.0

    async def Infer(
        self, request: common_pb2.InferRequest, context: Context
    ) -> AsyncIterator[common_pb2.InferChunk]:
        with structlog.contextvars.bound_contextvars(request_id=request.request_id):
            lease = await self._check_call(request, context)
            try:
                # The model's own template (and vocabulary), before a slot is taken: a chat
                # or continuation it refuses is the client's mistake, said as such.
                prepared = await render(self.backend, request)
            except ValueError as exc:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"model {self.identity.model!r} cannot take this request: {exc}",
                )
            refusal = self.slots.start(lease, self.leases.now())
            if refusal is not None:
                await context.abort(grpc.StatusCode[refusal.code], refusal.message)
            prepared = self._spread(prepared)
            if lease is not None:
                self.leases.started(lease.lease_id)
            self.last_activity = time.time()
            ok = False
            tokens = 0
            try:
                async for chunk in coalesced(stream(self.backend, request, prepared)):
                    tokens = chunk.completion_tokens or tokens
                    yield chunk
                ok = True
            except RequestRefused as exc:
                # The engine's own refusal of what was asked (before any token): the client's.
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"model {self.identity.model!r} cannot take this request: {exc}",
                )
            except Exception as exc:
                # A backend error is the worker's failure, said as a status, never a traceback.
                log.exception("backend failed during a request")
                await context.abort(grpc.StatusCode.INTERNAL, f"backend error: {exc}")
            finally:
                self.slots.finish()
                self.last_activity = time.time()
                if lease is not None:
                    self.leases.ended(lease.lease_id, ok, tokens)
                if ok:
                    self.completed += 1
                else:
                    self.failed += 1
                    log.info("stream ended early")

    def _spread(self, prepared: Prepared) -> Prepared:
        """n choices on the request's one slot: the others decode at once only in slots free
        now, the rest after (waiting for n free sequences would starve it under load)."""
        generation = prepared.generation
        if generation.n <= 1:
            return prepared
        parallel = 1 + min(generation.n - 1, self.slots.free)
        return dataclasses.replace(
            prepared, generation=dataclasses.replace(generation, parallel=parallel)
        )

    async def _check_call(
        self, request: common_pb2.InferRequest, context: Context
    ) -> LeaseToken | None:
        """Aborts a call this worker must not serve: not allowed, loading, or invalid; else
        the lease it comes with (None: none).

        Who may call comes first, before anything about this worker is looked up or said.
        """
        lease = await self._check_caller(request, context)
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is still loading its model")
        if not request.max_tokens:
            # A lease holder may leave it out too; the queen puts its own default in first.
            request.max_tokens = min(DEFAULT_MAX_TOKENS, self.max_tokens_cap)
        problem = infer_request_problem(request, self.max_tokens_cap)
        if not problem and request.model != self.identity.model:
            problem = (
                f"worker {self.identity.worker_id} serves model {self.identity.model!r}, "
                f"not {request.model!r}"
            )
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.backend.embeds:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {self.identity.worker_id} serves embeddings of model "
                f"{self.identity.model!r}, not completions: call Embed",
            )
        return lease

    async def Embed(
        self, request: common_pb2.EmbedRequest, context: Context
    ) -> common_pb2.EmbedResponse:
        """Embeds on one slot, as a completion would take it (the queen counts it so)."""
        # Who may call is the method table's (METHODS: the worker credential).
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is still loading its model")
        problem = embed_request_problem(request)
        if not problem and request.model != self.identity.model:
            problem = (f"worker {self.identity.worker_id} serves model "
                       f"{self.identity.model!r}, not {request.model!r}")  # fmt: skip
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        refusal = self.slots.start(None, self.leases.now())
        if refusal is not None:
            await context.abort(grpc.StatusCode[refusal.code], refusal.message)
        try:
            vectors, tokens = await self.backend.embed(list(request.input))
        except RequestRefused as exc:
            self.failed += 1
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION if not self.backend.embeds
                                else grpc.StatusCode.INVALID_ARGUMENT, str(exc))  # fmt: skip
        except Exception as exc:
            self.failed += 1
            log.exception("backend failed to embed")
            await context.abort(grpc.StatusCode.INTERNAL, f"backend error: {exc}")
        finally:
            self.slots.finish()
            self.last_activity = time.time()
        if request.dimensions and request.dimensions != len(vectors[0]):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"dimensions {request.dimensions} is not supported: model "
                                f"{self.identity.model!r} embeds in {len(vectors[0])} "
                                "dimensions only")  # fmt: skip
        self.completed += 1
        return common_pb2.EmbedResponse(
            embeddings=[common_pb2.Embedding(values=v) for v in vectors],
            prompt_tokens=tokens, request_id=request.request_id,
        )  # fmt: skip

    async def _check_caller(
        self, request: common_pb2.InferRequest, context: Context
    ) -> LeaseToken | None:
        """A lease holder may call us (its lease is checked here, with or without tokens);
        everyone else needs this worker's own credential (its queen and its hive have it)."""
        if request.lease_id:
            return await self._check_lease(request.lease_id, context)
        if not self.tokens.enabled:
            return None
        if "worker" not in self.tokens.roles_of(bearer(context.invocation_metadata())):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong credentials: workers serve their queen and hive, or a client "
                "holding a lease from Queen.Lease",
            )
        return None

    async def _check_lease(self, token: str, context: Context) -> LeaseToken:
        """The lease if it was signed for this worker, has not expired and was never used
        (or given back). With tokens a lease is a credential: a bad one is UNAUTHENTICATED."""
        lease = self.leases.read(token)
        if lease is None or self.slots.lease_problem(lease, self.leases.now()):
            if self.tokens.enabled:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this lease is not valid here (unknown, expired or used); ask the queen for "
                    "a new lease",
                )
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"lease {lease_id_of(token)[:40]!r} is unknown, expired or already used on "
                f"worker {self.identity.worker_id}; ask the queen for a new lease",
            )
        assert lease is not None  # abort raised otherwise
        return lease

    async def Leases(
        self, request_iterator: AsyncIterator[worker_pb2.LeaseNotice], context: Context
    ) -> AsyncIterator[worker_pb2.LeaseReport]:
        async for report in self.leases.serve(request_iterator, context):
            yield report

    async def GetStatus(
        self, request: worker_pb2.GetStatusRequest, context: Context
    ) -> worker_pb2.GetStatusResponse:
        self.heard_from_hive = self.clock.monotonic()
        return worker_pb2.GetStatusResponse(worker=self.record())

    async def Shutdown(
        self, request: worker_pb2.ShutdownRequest, context: Context
    ) -> worker_pb2.ShutdownResponse:
        problem = grace_problem(request.grace_seconds)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if request.grace_seconds:
            self.stop_grace = request.grace_seconds
        in_flight = self.slots.in_flight
        log.info("shutdown requested", grace=self.stop_grace, in_flight=in_flight)
        self.stop.set()
        return worker_pb2.ShutdownResponse(in_flight=in_flight)

    def record(self) -> common_pb2.WorkerRecord:
        ident = self.identity
        if not self.ready:
            state = common_pb2.WORKER_STATE_LOADING
        elif self.slots.in_flight:
            state = common_pb2.WORKER_STATE_BUSY
        else:
            state = common_pb2.WORKER_STATE_IDLE
        record = common_pb2.WorkerRecord(
            id=ident.worker_id,
            hive_id=ident.hive_id,
            model=ident.model,
            backend=ident.backend,
            device=ident.device,
            state=state,
            slots_total=ident.slots,
            slots_available=self.slots.free,
            started_at=timestamp(self.started_at),
            last_activity=timestamp(self.last_activity),
            requests_completed=self.completed,
            requests_failed=self.failed,
            backend_options=ident.backend_options,
            load_progress=self.load_progress,
            status_detail=self.status_detail,
            task=common_pb2.WORKER_TASK_EMBED
            if self.backend.embeds
            else common_pb2.WORKER_TASK_GENERATE,
            context_length=self.backend.context_length,
            features=self.backend.features(),
        )
        cache = self.backend.prefix_cache() if self.ready else None
        if cache is not None:
            record.prefix_cache.CopyFrom(cache)
        return record


# Only the queen and the hive call workers (worker token); Infer is also open to a client with
# a lease, which the handler checks (the lease id is in the request, not the metadata).
METHODS = method_table(
    **{"apiary.v1.Worker": frozenset({"worker"}), "apiary.v1.Worker/Infer": OPEN}
)


async def create_server(
    listen: str, service: WorkerService, security: Security | None = None
) -> RunningServer:
    """Bind (port 0 allowed) and start; health stays NOT_SERVING until the backend is loaded."""

    def register(server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_WorkerServicer_to_server(service, server)

    return await start_server(
        listen, register, SERVICE_NAMES, serving=False, security=security, methods=METHODS
    )
