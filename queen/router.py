"""The Queen service: routes each Infer to a free worker and relays its stream chunk by chunk."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from apiary.protoutil import naming
from apiary.serving import Context
from apiary.validation import infer_request_problem
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc
from queen.channels import Channels
from queen.registry import Lease, Registry
from queen.scheduler import ModelGone, QueueFull, Scheduler

log = structlog.get_logger("queen.router")

S = common_pb2
MAX_ATTEMPTS = 3
RETRY_BACKOFF_SECONDS = 0.1
# Worker answers that mean "try another worker" when no chunk has been sent yet.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class QueenService(queen_pb2_grpc.QueenServicer):
    def __init__(
        self, registry: Registry, scheduler: Scheduler, channels: Channels, max_tokens_cap: int
    ) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.channels = channels
        self.max_tokens_cap = max_tokens_cap

    async def Infer(
        self, request: common_pb2.InferRequest, context: Context
    ) -> AsyncIterator[common_pb2.InferChunk]:
        request_id = request.request_id or uuid.uuid4().hex
        with structlog.contextvars.bound_contextvars(request_id=request_id, model=request.model):
            problem = infer_request_problem(request, self.max_tokens_cap)
            if problem:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            if not self.registry.has_model(request.model):
                await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown_model(request.model))
            forward = common_pb2.InferRequest()
            forward.CopyFrom(request)
            forward.request_id = request_id
            async for chunk in self._route(forward, context):
                yield chunk

    def _unknown_model(self, model: str) -> str:
        if not self.registry.models():
            return (
                f"unknown model {model!r}: no workers are registered yet; "
                "start one with `apiary worker spawn`"
            )
        return f"unknown model {model!r}; models served: {naming(self.registry.models())}"

    async def _route(
        self, request: common_pb2.InferRequest, context: Context
    ) -> AsyncIterator[common_pb2.InferChunk]:
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = None if remaining is None else loop.time() + remaining
        tried: set[str] = set()
        last_error = ""
        for attempt in range(MAX_ATTEMPTS):
            lease = await self._acquire(request.model, deadline, frozenset(tried), context)
            sent = 0
            ok: bool | None = None
            timeout = None if deadline is None else max(deadline - loop.time(), 0.001)
            call = self.channels.worker(lease.address).Infer(request, timeout=timeout)
            try:
                async for chunk in call:
                    if sent == 0:
                        chunk.worker_id = lease.worker_id
                    yield chunk
                    sent += 1
                ok = True
                return
            except grpc.aio.AioRpcError as exc:
                ok = False
                code = exc.code()
                if sent or code not in RETRYABLE:
                    await self._abort_after_worker_error(context, lease, exc, sent)
                last_error = f"worker {lease.worker_id}: {code.name}: {exc.details()}"
                # By address, not id: a worker restarted under the same id is a new process.
                log.warning(
                    "worker failed before first chunk; trying another",
                    worker_id=lease.worker_id,
                    code=code.name,
                    attempt=attempt + 1,
                )
                tried.add(lease.address)
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.registry.mark_unreachable(lease.worker_id)
            finally:
                if not call.done():
                    call.cancel()
                self.scheduler.release(lease, ok)
            backoff = RETRY_BACKOFF_SECONDS * 2**attempt
            if deadline is not None and loop.time() + backoff >= deadline:
                break
            await asyncio.sleep(backoff)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"no worker of model {request.model!r} could serve the request after "
            f"{MAX_ATTEMPTS} attempt(s); last error: {last_error}",
        )

    async def _acquire(
        self,
        model: str,
        deadline: float | None,
        exclude: frozenset[str],
        context: Context,
    ) -> Lease:
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(deadline - loop.time(), 0.0)
        try:
            return await self.scheduler.acquire(model, timeout, exclude)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no free worker of model {model!r} before the deadline; "
                f"{self.scheduler.queue_depth(model)} other request(s) waiting",
            )
        except QueueFull as exc:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"queen queue is full: {exc}; retry later"
            )
        except ModelGone as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        raise AssertionError("unreachable: context.abort raises")

    async def _abort_after_worker_error(
        self,
        context: Context,
        lease: Lease,
        exc: grpc.aio.AioRpcError,
        sent: int,
    ) -> None:
        code = exc.code()
        if sent:
            # Never retried: a second worker would repeat tokens the client already has.
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"worker {lease.worker_id} failed after {sent} chunk(s) were delivered "
                f"({code.name}: {exc.details()}); the stream is incomplete",
            )
        await context.abort(code, exc.details() or code.name)

    async def ListModels(
        self, request: queen_pb2.ListModelsRequest, context: Context
    ) -> queen_pb2.ListModelsResponse:
        models = []
        for name in self.registry.models():
            info = queen_pb2.ModelInfo(name=name, queued=self.scheduler.queue_depth(name))
            for entry in self.registry.workers_of_model(name):
                state = entry.view().state
                if state == S.WORKER_STATE_IDLE:
                    info.idle += 1
                elif state == S.WORKER_STATE_BUSY:
                    info.busy += 1
                elif state == S.WORKER_STATE_LOADING:
                    info.loading += 1
                elif state == S.WORKER_STATE_FAILED:
                    info.failed += 1
            models.append(info)
        return queen_pb2.ListModelsResponse(models=models)
