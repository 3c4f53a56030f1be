"""The Queen service: admits requests, routes each Infer (queen/requests/route.py), hands out
direct leases, and lists the models served. What each client may hold at once is counted per
client (queen/quotas.py). Once the queen is stopping it takes no new request."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass

import grpc
import structlog

from apiary.errors import StatusError
from apiary.protoutil import timestamp
from apiary.security import TokenSet, bearer
from apiary.serving import Context
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc
from queen import stopping
from queen.cluster import Cluster
from queen.leases.book import Lease as DirectLease
from queen.leases.manager import DEFAULT_MAX_TTL, DEFAULT_TTL
from queen.members import GENERATE_TAG, live_state
from queen.quotas import Quotas, References, Refusal, peer_host
from queen.registry import Registry
from queen.requests.admission import admit
from queen.requests.embedding import embed
from queen.requests.in_flight import InFlight
from queen.requests.record import Caller
from queen.requests.route import Call, Route
from queen.routing.ask import Ask, Slot
from queen.routing.desk import DEFAULT_MAX_WAIT

# Identities that may call the Queen service, and so have a name to be counted under.
CALLER_ROLES = frozenset({"client", "admin"})


@dataclass(frozen=True)
class Accepted:
    """An Infer request the queen took: its route, and what ends it once the call is over."""

    route: Route
    close: Callable[[], None]

    @contextmanager
    def logged(self) -> Iterator[None]:
        """Log lines within name the request (the queen's id, the client's reference)."""
        route = self.route
        with structlog.contextvars.bound_contextvars(
            request_id=route.request.request_id, client=route.record.caller.client,
            client_request_id=route.record.caller.reference, model=route.request.model,
        ):  # fmt: skip
            yield


def refused(refusal: Refusal) -> StatusError:
    return StatusError(grpc.StatusCode[refusal.code], refusal.message)


class QueenService(queen_pb2_grpc.QueenServicer):
    def __init__(
        self,
        cluster: Cluster,
        tokens: TokenSet | None = None,
        quotas: Quotas | None = None,
        max_lease_ttl: float = DEFAULT_MAX_TTL,
        max_wait: float = DEFAULT_MAX_WAIT,
    ) -> None:
        self.cluster = cluster
        self.tokens = tokens or TokenSet()
        self.quotas = quotas or Quotas.of(max_streams=cluster.max_streams_per_client)
        self.references = References()
        self.max_lease_ttl = max_lease_ttl
        self.desk = cluster.desk
        self.desk.limit(self.quotas.queued, max_wait)
        self.in_flight = InFlight()

    def stop(self) -> None:
        """The queen is stopping: new Infer and Lease calls are refused, and requests waiting
        for a slot end now (UNAVAILABLE, saying so); streams in flight go on."""
        self.desk.stop()

    def routing_problem(self) -> str | None:
        """Why the queen routes no request now (None: it does): what /health answers."""
        if self.desk.stopping:
            return "draining: the queen is shutting down"
        return self.cluster.router.routing_problem()

    def model_ready(self, model: str) -> bool:
        """Whether a request for `model` would be served or queued now: what /ready answers."""
        return not self.desk.stopping and self.cluster.router.model_ready(model)

    def client_of(self, context: Context) -> str:
        """Whom a gRPC call counts against (see client_named)."""
        return self.client_named(bearer(context.invocation_metadata()), peer_host(context.peer()))

    def client_named(self, token: str, host: str) -> str:
        """Whom a call counts against: the name of its token's client (the single `client`
        token is "client", the admin token "admin"). With no tokens configured no caller has
        a name, so the peer's host stands in: every program on one machine is one client."""
        if self.tokens.enabled:
            names = sorted(
                identity.name
                for identity in self.tokens.identities(token)
                if identity.role in CALLER_ROLES
            )
            if names:
                return names[0]
        return host

    # ---- Infer ------------------------------------------------------------

    async def Infer(
        self, request: common_pb2.InferRequest, context: Context
    ) -> AsyncIterator[common_pb2.InferChunk]:
        try:
            accepted = self.accept(request, self.client_of(context), context)
        except StatusError as refused:
            await context.abort(refused.code, refused.message, refused.trailers)
        # However grpc.aio ends the call, this runs; the generator may never resume.
        # (grpc-stubs declares DoneCallback a class; any callable of the context will do.)
        context.add_done_callback(lambda _: accepted.close())  # type: ignore[arg-type]
        with accepted.logged():
            try:
                async with aclosing(accepted.route.serve()) as chunks:
                    async for chunk in chunks:
                        yield chunk
            except StatusError as failed:
                await context.abort(failed.code, failed.message, failed.trailers)
            finally:
                accepted.close()

    def accept(self, request: common_pb2.InferRequest, client: str, call: Call) -> Accepted:
        """Admission for an Infer request from any door (gRPC, HTTP): its route, whose
        serve() streams it, and the closer to run once the call is over, whichever way. A
        request without max_tokens gets the queen's default. Raises StatusError (counted)
        for a request the queen does not take."""
        if not request.max_tokens:
            request.max_tokens = self.cluster.default_max_tokens
        problem = self._infer_problem(request, client)
        if problem is not None:
            self.cluster.metrics.refused(request.model, problem.code.name)
            raise problem
        forward = common_pb2.InferRequest()
        forward.CopyFrom(request)
        # Always the queen's own id: a client's request_id is only its reference.
        forward.request_id = uuid.uuid4().hex
        route = Route(self.cluster, forward, call, Caller(client, request.request_id))
        self.in_flight.add(route)
        return Accepted(route, self._closer(route))

    def _infer_problem(self, request: common_pb2.InferRequest, client: str) -> StatusError | None:
        """Why the request is not taken; None if it is (then its stream and reference are
        counted, until its route's closer runs)."""
        if self.desk.stopping:
            return stopping.status(stopping.refused_while_stopping())
        problem = admit(self.cluster, request)
        if problem is not None:
            return problem
        if request.lease_id:
            return StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "lease_id is for calling a worker directly, not the queen",
            )
        taken = self.references.claim(client, request.request_id)
        if taken is not None:
            return refused(taken)
        full = self.quotas.streams.acquire(client)
        if full is not None:
            self.references.drop(client, request.request_id)
            return refused(full)
        return None

    def _closer(self, route: Route) -> Callable[[], None]:
        """Once the call is over: the request recorded (if it was not), its slot given back,
        its stream and reference no longer counted. Runs once, from whichever path is first."""
        closed = False

        def close() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            route.ended()
            self.in_flight.discard(route)
            caller = route.record.caller
            self.quotas.streams.release(caller.client)
            self.references.drop(caller.client, caller.reference)

        return close

    # ---- Embed ------------------------------------------------------------

    async def Embed(
        self, request: common_pb2.EmbedRequest, context: Context
    ) -> common_pb2.EmbedResponse:
        try:
            return await self.embed(request, self.client_of(context), context)
        except StatusError as failed:
            await context.abort(failed.code, failed.message, failed.trailers)
        raise AssertionError("abort raises")  # for the type checker

    async def embed(
        self, request: common_pb2.EmbedRequest, client: str, call: Call
    ) -> common_pb2.EmbedResponse:
        """Admission as for Infer (counted against the client's streams while it runs), then
        the vectors of a worker of the model (queen/requests/embedding.py)."""
        problem: StatusError | None = None
        if self.desk.stopping:
            problem = stopping.status(stopping.refused_while_stopping())
        else:
            problem = admit(self.cluster, request)
        full = None if problem else self.quotas.streams.acquire(client)
        problem = problem or (refused(full) if full else None)
        metrics = self.cluster.metrics
        if problem is not None:
            metrics.embedded(request.model, problem.code.name)
            raise problem
        forward = common_pb2.EmbedRequest()
        forward.CopyFrom(request)
        forward.request_id = uuid.uuid4().hex  # the queen's own id, as for Infer
        try:
            answer = await embed(self.cluster, forward, client, call.time_remaining())
        except StatusError as failed:
            metrics.embedded(request.model, failed.code.name)
            raise
        except asyncio.CancelledError:
            metrics.embedded(request.model, "CANCELLED")
            raise
        finally:
            self.quotas.streams.release(client)
        metrics.embedded(request.model, "OK", len(request.input))
        # The client's reference when it sent one, else the queen's id.
        answer.request_id = request.request_id or forward.request_id
        return answer

    # ---- Lease ------------------------------------------------------------

    async def Lease(
        self, request: queen_pb2.LeaseRequest, context: Context
    ) -> queen_pb2.LeaseResponse:
        ttl = request.ttl_seconds or min(DEFAULT_TTL, self.max_lease_ttl)
        try:
            problem = self._lease_problem(request)
            if problem is not None:
                raise problem
            lease = await self._lease(request, ttl, self.client_of(context), context)
        except StatusError as exc:
            self._count_lease(request.model, exc.code.name)
            await context.abort(exc.code, exc.message, exc.trailers)
        except asyncio.CancelledError:
            self._count_lease(request.model, "CANCELLED")
            raise
        self._count_lease(request.model, "OK")
        return queen_pb2.LeaseResponse(
            lease_id=lease.token,
            worker_id=lease.slot.worker_id,
            address=lease.slot.address,
            expires_at=timestamp(lease.expires_at),
            ttl_seconds=ttl,
        )

    def _lease_problem(self, request: queen_pb2.LeaseRequest) -> StatusError | None:
        if self.desk.stopping:
            return stopping.status(stopping.refused_while_stopping())
        problem = admit(self.cluster, request)
        if problem is None and not 0 <= request.ttl_seconds <= self.max_lease_ttl:
            problem = StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ttl_seconds must be within 0..{self.max_lease_ttl:g} (the queen's "
                "--max-lease-ttl)",
            )
        return problem

    def _count_lease(self, model: str, code: str) -> None:
        metrics = self.cluster.metrics
        metrics.leases.labels(metrics.model_label(model), code).inc()

    async def _lease(
        self, request: queen_pb2.LeaseRequest, ttl: float, client: str, context: Context
    ) -> DirectLease:
        """A reserved slot, counted against the client's leases until the lease ends."""
        leases = self.quotas.leases
        full = leases.acquire(client)
        if full is not None:
            raise refused(full)
        try:
            slot = await self._lease_slot(request, client, context)
        except BaseException:
            leases.release(client)  # no lease came of it
            raise
        return self.cluster.leases.grant(
            slot, ttl, on_end=lambda: leases.release(client), owner=client
        )

    async def _lease_slot(
        self, request: queen_pb2.LeaseRequest, client: str, context: Context
    ) -> Slot:
        ask = Ask(request.model, frozenset([*request.required_tags, GENERATE_TAG]), request.policy)
        return await self.desk.take(client, ask, context.time_remaining())

    async def ReleaseLease(
        self, request: queen_pb2.ReleaseLeaseRequest, context: Context
    ) -> queen_pb2.ReleaseLeaseResponse:
        roles = self.tokens.roles_of(bearer(context.invocation_metadata()))
        by = None if "admin" in roles else self.client_of(context)  # operators: anyone's
        if not self.cluster.leases.release(request.lease_id, by):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no active lease {request.lease_id!r} (it ended, expired or never existed)",
            )
        return queen_pb2.ReleaseLeaseResponse()

    # ---- ListModels -------------------------------------------------------

    async def ListModels(
        self, request: queen_pb2.ListModelsRequest, context: Context
    ) -> queen_pb2.ListModelsResponse:
        registry = self.cluster.registry
        models = [
            model_info(registry, name, self.desk.queue_depth(name))
            for name in sorted(set(registry.models()) | registry.catalog_models())
        ]
        return queen_pb2.ListModelsResponse(models=models)


def model_info(registry: Registry, name: str, queued: int) -> queen_pb2.ModelInfo:
    """Workers of the model by state, ready ones as the queen's slot count sees them."""
    info = queen_pb2.ModelInfo(
        name=name, queued=queued, hives=sorted(h.id for h in registry.catalog_hives(name))
    )
    lengths = []
    for entry in registry.workers_of_model(name):
        if entry.record.task == common_pb2.WORKER_TASK_EMBED:
            info.task = common_pb2.WORKER_TASK_EMBED
        elif not info.task:
            info.task = common_pb2.WORKER_TASK_GENERATE
        if entry.record.context_length:
            lengths.append(entry.record.context_length)
        state = live_state(entry)
        if state == common_pb2.WORKER_STATE_IDLE:
            info.idle += 1
        elif state == common_pb2.WORKER_STATE_BUSY:
            info.busy += 1
        elif state == common_pb2.WORKER_STATE_LOADING:
            info.loading += 1
        elif state == common_pb2.WORKER_STATE_FAILED:
            info.failed += 1
    info.context_length = min(lengths, default=0)
    return info
