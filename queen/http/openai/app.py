"""The OpenAI-compatible HTTP front as a Starlette application on the queen's event loop.

A request is read (queen/http/openai/params.py), taken or refused by the same admission as gRPC
Infer (QueenService.accept: quotas, the model, validation), and routed by the same Route:
desk, failover, history, events and metrics are the gRPC ones. The answer waits for the
first chunk before sending its status, so a refusal or a failure before any token is a real
HTTP error, not an error inside a 200 stream. A client that goes away is noticed at once
(the ASGI disconnect message), whatever the request is waiting for: the route is cancelled,
its slot and worker call given back, and it is recorded as cancelled.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as Path
from starlette.types import Receive, Scope, Send

from apiary.errors import StatusError
from apiary.security import TokenSet
from apiary.serving import MAX_MESSAGE_BYTES
from apiary.validation import MAX_NAME_LENGTH, name_problem
from protos.v1 import common_pb2
from queen.http.asgi import (
    SSE_HEADERS,
    ClientGone,
    send_body,
    send_error,
    send_start,
    until_disconnect,
)
from queen.http.errors import ApiError, from_error
from queen.http.hosts import is_address_or_localhost
from queen.http.json_body import MAX_DEPTH
from queen.http.openai import params
from queen.http.openai.shapes import Answer, embeddings, error_event, model_list, model_object
from queen.rpc.queen import Accepted, QueenService, model_info

log = structlog.get_logger("queen.http.openai")

REQUEST_ID = "x-request-id"
# Requests with the same value stick to one worker (cache-aware routing), like `user`.
SESSION_AFFINITY = "x-session-affinity"
# A probe's failure is of the moment: no cache may keep it.
NO_STORE = {"cache-control": "no-store"}
# A client that takes nothing of its stream for this long is cut (--client-write-timeout): a
# client that stops reading would otherwise hold its worker's slot for as long as it likes.
DEFAULT_WRITE_TIMEOUT = 30.0


class NoDeadline:
    """An HTTP request carries no deadline: waits for a slot end at the queen's --max-wait."""

    def time_remaining(self) -> float | None:
        return None


class Front:
    """The endpoints, over the queen's service."""

    def __init__(
        self,
        service: QueenService,
        max_body: int = MAX_MESSAGE_BYTES,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    ) -> None:
        self.service = service
        self.write_timeout = write_timeout
        self.tokens: TokenSet = service.tokens
        self.max_body = max_body
        self.created = int(time.time())

    # ---- who is calling ---------------------------------------------------

    def guard(self, request: Request) -> None:
        """What another site's page could do, refused: without tokens, a Host that is not an
        IP address or localhost (DNS rebinding) is 403; a POST body that is not
        application/json (a form or text/plain post needs no CORS preflight) is 415."""
        if not self.tokens.enabled and not is_address_or_localhost(request.headers.get("host", "")):
            raise ApiError(403, "this queen has no tokens, so its API answers only to an IP "
                           "address or localhost in the Host header (against DNS rebinding); "
                           "call it by address", "permission_error",
                           "host_not_allowed")  # fmt: skip
        if request.method == "POST":
            kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind != "application/json":
                raise ApiError(415, f"the body must be JSON, sent as Content-Type: "
                               f"application/json (got {kind or 'none'})",
                               code="unsupported_media_type")  # fmt: skip

    def client(self, request: Request) -> str:
        """The caller's name (as gRPC calls are counted), after the request is guarded and its
        bearer token is checked: none or an unknown one is 401, one that is not a client's is
        403."""
        self.guard(request)
        host = request.client.host if request.client else "unknown"
        if not self.tokens.enabled:
            return host
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing bearer token: send Authorization: Bearer <client token>",
                           "authentication_error", "invalid_api_key")  # fmt: skip
        roles = self.tokens.roles_of(token.strip())
        if not roles:
            raise ApiError(401, "invalid token", "authentication_error", "invalid_api_key")
        if not roles & {"client", "admin"}:
            raise ApiError(403, "this token is not a client token", "permission_error",
                           "permission_denied")  # fmt: skip
        return self.service.client_named(token.strip(), host)

    # ---- endpoints --------------------------------------------------------

    async def models(self, request: Request) -> Response:
        self.client(request)
        return JSONResponse(model_list([self.described(n) for n in self.served()], self.created))

    async def model(self, request: Request) -> Response:
        self.client(request)
        name = request.path_params["model"]
        if name not in self.served():
            raise unknown_model(name, self.served())
        return JSONResponse(model_object(*self.described(name), self.created))

    def described(self, name: str) -> tuple[str, int, int]:
        """A model's name, what it serves and its context length, from its workers."""
        info = model_info(self.service.cluster.registry, name, 0)
        return name, info.task, info.context_length

    async def health(self, request: Request) -> Response:
        """For load balancers, without a token: 200 while the queen routes, else 503 and why
        (draining, starting, no worker). Says nothing else of the cluster."""
        problem = self.service.routing_problem()
        if problem is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": problem}, 503, NO_STORE)

    async def ready(self, request: Request) -> Response:
        """For load balancers, without a token: 200 if a request for `?model=` would be served
        or queued now, else 503 (an unknown model reads as not ready: nothing more is said)."""
        model = request.query_params.get("model", "")
        problem = name_problem("model", model) if model else "GET /ready needs ?model=NAME"
        if problem:
            raise ApiError(400, problem, param="model")
        if self.service.model_ready(model):
            return JSONResponse({"model": model, "ready": True})
        return JSONResponse({"model": model, "ready": False}, 503, NO_STORE)

    def served(self) -> list[str]:
        """Models a request can be routed to: those with workers, and those autospawn
        starts on demand."""
        cluster = self.service.cluster
        return sorted(set(cluster.registry.models()) | set(cluster.autospawn.spawnable()))

    async def chat(self, request: Request) -> Response:
        return await self.infer(request, params.chat_request)

    async def completions(self, request: Request) -> Response:
        return await self.infer(request, params.completion_request)

    async def embeddings(self, request: Request) -> Response:
        client = self.client(request)
        body: object = None
        try:
            body = await self.body(request)
            params.check_body(body)
            wanted = params.embed_request(body)
        except params.BadRequest as bad:
            model = body.get("model") if isinstance(body, dict) else None
            self.service.cluster.metrics.embedded(model if isinstance(model, str) else "",
                                                  "INVALID_ARGUMENT")  # fmt: skip
            raise ApiError(400, bad.message, "invalid_request_error", bad.code, bad.param) from None
        wanted.request.request_id = self.reference(request)
        try:
            answer = await self.service.embed(wanted.request, client, NoDeadline())
        except StatusError as refused:
            raise from_error(refused) from None
        shaped = embeddings(answer, wanted.request.model, wanted.encoding)
        return JSONResponse(
            shaped, headers={REQUEST_ID: wanted.request.request_id or answer.request_id}
        )

    async def infer(self, request: Request, read: Callable[[object], params.Wanted]) -> Response:
        client = self.client(request)
        wanted = await self.wanted(request, read)
        reference = wanted.request.request_id = self.reference(request)
        if affinity := request.headers.get(SESSION_AFFINITY, ""):
            wanted.request.session_id = params.session_key(affinity)
        try:
            accepted = self.service.accept(wanted.request, client, NoDeadline())
        except StatusError as refused:
            raise from_error(refused) from None
        queen_id = accepted.route.request.request_id
        answer = Answer(
            id=("chatcmpl-" if wanted.chat else "cmpl-") + queen_id,
            model=wanted.request.model, created=int(time.time()), chat=wanted.chat,
            include_usage=wanted.include_usage, logprobs=wanted.request.logprobs,
        )  # fmt: skip
        if wanted.user:
            log.info("request from end user", request_id=queen_id, user=wanted.user[:128])
        return InferResponse(accepted, answer, wanted.stream, {REQUEST_ID: reference or queen_id},
                             self.write_timeout)  # fmt: skip

    def reference(self, request: Request) -> str:
        """The client's X-Request-Id ('' for none); one too long is a 400."""
        reference = request.headers.get(REQUEST_ID, "")
        if len(reference) > MAX_NAME_LENGTH:
            raise ApiError(400, f"{REQUEST_ID} is longer than {MAX_NAME_LENGTH} characters")
        return reference

    async def wanted(
        self, request: Request, read: Callable[[object], params.Wanted]
    ) -> params.Wanted:
        """The request read from its body. One refused here is counted as gRPC counts a
        request refused for its fields (INVALID_ARGUMENT; too large: RESOURCE_EXHAUSTED, as
        gRPC's message limit says)."""
        body: object = None
        try:
            body = await self.body(request)
            params.check_body(body)
            return read(body)
        except params.BadRequest as bad:
            self.count_refused(body, "INVALID_ARGUMENT")
            raise ApiError(400, bad.message, "invalid_request_error", bad.code, bad.param) from None
        except ApiError as error:
            self.count_refused(body, "INVALID_ARGUMENT" if error.status == 400 else
                               "RESOURCE_EXHAUSTED")  # fmt: skip
            raise

    def count_refused(self, body: object, code: str) -> None:
        model = body.get("model") if isinstance(body, dict) else None
        self.service.cluster.metrics.refused(model if isinstance(model, str) else "", code)

    async def body(self, request: Request) -> object:
        """The JSON body, at most max_body bytes (413 beyond, before reading it all)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise too_large(self.max_body)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body:
                raise too_large(self.max_body)
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, f"the body nests deeper than {MAX_DEPTH} levels",
                           code="invalid_json") from None  # fmt: skip


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes",
                    code="request_too_large")  # fmt: skip


def unknown_model(name: str, served: list[str]) -> ApiError:
    models = ", ".join(served) or "none yet"
    return ApiError(404, f"unknown model {name!r}; models served: {models}",
                    code="model_not_found", param="model")  # fmt: skip


class InferResponse(Response):
    """The answer to one accepted request, sent as it comes (SSE) or whole (JSON); ends the
    request at once if the client disconnects, and closes it however the call ends."""

    def __init__(
        self,
        accepted: Accepted,
        answer: Answer,
        stream: bool,
        headers: dict[str, str],
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    ) -> None:
        self.accepted, self.answer, self.stream = accepted, answer, stream
        self.extra = headers
        self.write_timeout = write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self.accepted.logged():
            try:
                await until_disconnect(receive, self.respond(send))
            except ClientGone:
                log.info("client disconnected; request cancelled")
            finally:
                self.accepted.close()

    async def respond(self, send: Send) -> None:
        async with aclosing(self.accepted.route.serve()) as chunks:
            try:
                first = await anext(chunks, None)
            except StatusError as failed:
                await send_error(send, from_error(failed), self.extra)
                return
            if self.stream:
                await self.send_stream(send, first, chunks)
            else:
                await self.send_whole(send, first, chunks)

    async def send_stream(
        self, send: Send, first: common_pb2.InferChunk | None, rest: AsyncIterator[Any]
    ) -> None:
        answer = self.answer
        await send_start(send, 200, "text/event-stream", {**SSE_HEADERS, **self.extra})
        try:
            if first is not None:
                await self.send_body(send, answer.event(first))
                async for chunk in rest:
                    event = answer.event(chunk)
                    if event:
                        await self.send_body(send, event)
            await self.send_body(send, answer.closing(), last=True)
        except StatusError as failed:
            error = from_error(failed)
            await send_body(send, error_event(error), last=True)

    async def send_body(self, send: Send, body: bytes, last: bool = False) -> None:
        """A piece of the stream, or ClientGone once the client has taken nothing of it for
        write_timeout seconds (the route then ends, and its record says why)."""
        if not self.write_timeout:
            await send_body(send, body, last)
            return
        try:
            await asyncio.wait_for(send_body(send, body, last), self.write_timeout)
        except TimeoutError:
            why = (f"the client took nothing of its stream for {self.write_timeout:g} s "
                   "(--client-write-timeout)")  # fmt: skip
            self.accepted.route.stalled(why)
            raise ClientGone(why) from None

    async def send_whole(
        self, send: Send, first: common_pb2.InferChunk | None, rest: AsyncIterator[Any]
    ) -> None:
        answer = self.answer
        try:
            if first is not None:
                answer.take(first)
                async for chunk in rest:
                    answer.take(chunk)
        except StatusError as failed:
            await send_error(send, from_error(failed), self.extra)
            return
        body = json.dumps(answer.whole(), separators=(",", ":")).encode()
        await send_start(send, 200, "application/json", self.extra)
        await send_body(send, body, last=True)


# ---- the application --------------------------------------------------------


def api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path, wrong method) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = (f"no such endpoint {request.url.path}; this server has GET /v1/models, "
                   "POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, "
                   "GET /health and "
                   "GET /ready?model=NAME")  # fmt: skip
    else:
        message = f"{request.method} is not allowed on {request.url.path}"
    error = ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else
                     "method_not_allowed", headers=dict(exc.headers or {}))  # fmt: skip
    return api_error(request, error)


def server_error(request: Request, exc: Exception) -> Response:
    """A bug of ours: logged with its traceback here, a plain 500 for the client."""
    log.exception("HTTP front error", path=request.url.path, exc_info=exc)
    return api_error(request, ApiError(500, "internal error in the queen's HTTP front",
                                       "server_error"))  # fmt: skip


def openai_app(
    service: QueenService,
    max_body: int = MAX_MESSAGE_BYTES,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
) -> Starlette:
    front = Front(service, max_body, write_timeout)
    handlers: dict[Any, Callable[[Request, Exception], Response]] = {
        ApiError: api_error, HTTPException: http_error, Exception: server_error,
    }  # fmt: skip
    return Starlette(
        routes=[
            Path("/health", front.health, methods=["GET"]),
            Path("/ready", front.ready, methods=["GET"]),
            Path("/v1/models", front.models, methods=["GET"]),
            Path("/v1/models/{model:path}", front.model, methods=["GET"]),
            Path("/v1/chat/completions", front.chat, methods=["POST"]),
            Path("/v1/completions", front.completions, methods=["POST"]),
            Path("/v1/embeddings", front.embeddings, methods=["POST"]),
        ],
        exception_handlers=handlers,
    )
