"""`AsyncClient`: every call to a cluster, on asyncio: inference streams (resumed on another
queen when theirs goes away mid-stream), models and direct leases, and under `.admin` the
admin calls; all of them through one Transport (queens, failover, deadlines)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable
from typing import Unpack

import grpc

from apiary.client.admin import AsyncAdmin
from apiary.client.queens import DEFAULT_TIMEOUT, MAX_RESUMES, TOKEN_ENV, queen_lost, queens_from
from apiary.client.requests import InferOptions, Message, infer_request
from apiary.client.transport import Transport
from apiary.controls import unmovable
from apiary.protoutil import continued
from apiary.security import TlsFiles
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc, worker_pb2_grpc


class AsyncClient:
    """A client of one cluster (one queen, or several serving it), for one event loop.

    `queens`: "HOST:PORT", "A,B" or a list (default $APIARY_QUEEN, else 127.0.0.1:7070).
    `token`: a client or admin token (default $APIARY_TOKEN, read here). `tls_ca` turns TLS
    on; `tls_cert`/`tls_key` for a queen that requires client certificates. `timeout`: each
    call's deadline in seconds unless the call gives its own (math.inf: none).
    `wait_for_ready`: while no queen can be reached, keep trying until the deadline instead
    of failing at once.

    Failures are grpc's own `grpc.aio.AioRpcError` (`.code()`, `.details()`), unchanged; a
    TLS file that cannot be read is `apiary.security.SecurityError`, here.
    """

    def __init__(
        self,
        queens: str | Iterable[str] | None = None,
        *,
        token: str | None = None,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        wait_for_ready: bool = True,
    ) -> None:
        self._transport = Transport(
            queens_from(queens),
            token=os.environ.get(TOKEN_ENV, "") if token is None else token,
            tls=TlsFiles(cert=tls_cert, key=tls_key, ca=tls_ca),
            timeout=timeout,
            wait_for_ready=wait_for_ready,
        )
        # The admin calls, through the same channels, queens and deadlines.
        self.admin = AsyncAdmin(self._transport)
        # Streams resumed on another queen after theirs went away mid-stream (since made).
        self.resumes = 0

    @property
    def queens(self) -> tuple[str, ...]:
        return self._transport.queens

    @property
    def timeout(self) -> float:
        return self._transport.timeout

    def __repr__(self) -> str:
        return f"AsyncClient({','.join(self.queens)!r}, timeout={self.timeout:g})"

    async def close(self) -> None:
        """Close every channel (calls still open on them end)."""
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # ---- inference ------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        prompt: str,
        *,
        timeout: float | None = None,
        **options: Unpack[InferOptions],
    ) -> AsyncIterator[common_pb2.InferChunk]:
        """Stream a completion of `prompt`, chunk by chunk; the last carries finish_reason and
        the token counts."""
        return self.send(infer_request(model, prompt, **options), timeout=timeout)

    def chat(
        self,
        model: str,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        **options: Unpack[InferOptions],
    ) -> AsyncIterator[common_pb2.InferChunk]:
        """Stream the assistant's reply to `messages` ({"role": ..., "content": ...}), which the
        worker renders with its model's chat template."""
        return self.send(infer_request(model, messages=messages, **options), timeout=timeout)

    def send(
        self, request: common_pb2.InferRequest, *, timeout: float | None = None
    ) -> AsyncIterator[common_pb2.InferChunk]:
        """Stream the completion of a whole InferRequest (see `infer_request`)."""
        return self._resuming(request, self._transport.seconds(timeout))

    def _infer_stream(
        self, request: common_pb2.InferRequest, seconds: float
    ) -> AsyncIterator[common_pb2.InferChunk]:
        return self._transport.stream(
            lambda channel, left: queen_pb2_grpc.QueenStub(channel).Infer(request, timeout=left),
            seconds,
        )

    async def _resuming(
        self, request: common_pb2.InferRequest, seconds: float
    ) -> AsyncIterator[common_pb2.InferChunk]:
        """One stream, whatever happens to the queen relaying it: if that queen goes away
        mid-stream, the rest comes from another (or the same, once back), asked to continue
        after the token ids already received, so nothing is missing or repeated. Indexes are
        renumbered to stay consecutive."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        received, index, resumes = list(request.continuation.token_ids), 0, 0
        # A grammar-held answer or n choices cannot be continued exactly: never resumed.
        asked, exact = request, not unmovable(request)
        while True:
            try:
                async for chunk in self._infer_stream(asked, deadline - loop.time()):
                    received.extend(chunk.token_ids)
                    # Text without its token ids (a backend that sends none) cannot be
                    # continued exactly: such a stream is not resumed, it would repeat.
                    exact = exact and (bool(chunk.token_ids) or not chunk.text)
                    chunk.index, index = index, index + 1
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                if not (queen_lost(exc) and exact) or resumes >= MAX_RESUMES:
                    raise
                if deadline <= loop.time():
                    raise
                resumes += 1
                self.resumes += 1
                asked = continued(request, received)

    async def embed(
        self,
        model: str,
        texts: str | Iterable[str],
        *,
        required_tags: Iterable[str] = (),
        timeout: float | None = None,
    ) -> list[list[float]]:
        """One unit vector per text, in order, from an embedding worker of `model`."""
        request = common_pb2.EmbedRequest(
            model=model, input=[texts] if isinstance(texts, str) else texts,
            required_tags=required_tags,
        )  # fmt: skip
        reply = await self._transport.unary(
            lambda channel, left: queen_pb2_grpc.QueenStub(channel).Embed(request, timeout=left),
            timeout,
        )
        return [list(e.values) for e in reply.embeddings]

    async def list_models(self, *, timeout: float | None = None) -> list[queen_pb2.ModelInfo]:
        """The models the cluster serves, with worker counts by state and queue length."""
        request = queen_pb2.ListModelsRequest()
        reply = await self._transport.unary(
            lambda channel, left: queen_pb2_grpc.QueenStub(channel).ListModels(
                request, timeout=left
            ),
            timeout,
        )
        return list(reply.models)

    # ---- direct leases --------------------------------------------------------------------

    async def lease(
        self,
        model: str,
        *,
        required_tags: Iterable[str] = (),
        policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED,
        ttl_seconds: float = 0.0,
        timeout: float | None = None,
    ) -> queen_pb2.LeaseResponse:
        """A slot on a worker of `model`, reserved for one `infer_direct`; `release_lease` it
        if unused (else it expires after its TTL, 30 s unless given)."""
        request = queen_pb2.LeaseRequest(
            model=model, required_tags=required_tags, policy=policy, ttl_seconds=ttl_seconds
        )
        return await self._transport.unary(
            lambda channel, left: queen_pb2_grpc.QueenStub(channel).Lease(request, timeout=left),
            timeout,
        )

    async def release_lease(
        self, lease: queen_pb2.LeaseResponse | str, *, timeout: float | None = None
    ) -> None:
        """Give back a lease that will not be used (a lease or its id)."""
        lease_id = lease if isinstance(lease, str) else lease.lease_id
        request = queen_pb2.ReleaseLeaseRequest(lease_id=lease_id)
        await self._transport.unary(
            lambda channel, left: queen_pb2_grpc.QueenStub(channel).ReleaseLease(
                request, timeout=left
            ),
            timeout,
        )

    def infer_direct(
        self,
        lease: queen_pb2.LeaseResponse,
        request: common_pb2.InferRequest,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[common_pb2.InferChunk]:
        """Stream `request` from the leased worker itself: the queen is out of the token
        stream. No failover: the lease names one worker."""
        direct = common_pb2.InferRequest()
        direct.CopyFrom(request)
        direct.lease_id = lease.lease_id
        return self._transport.direct(
            lease.address,
            lambda channel, left: worker_pb2_grpc.WorkerStub(channel).Infer(direct, timeout=left),
            timeout,
        )
