"""The dashboard's endpoints: the page and its assets, JSON data under /api/, the event
stream (/api/stream, server-sent events), and the actions (POST), each through the admin
servicer the CLI's RPCs reach (queen/http/dashboard/local.py) after the gate (gate.py).

Listings are bounded (the first MAX_LISTED workers and hives, with the totals) and one
snapshot serves every open page for SNAPSHOT_AGE: turning records into JSON runs on the
queen's loop, so N pages refreshing must not cost N times the routing's time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from apiary.validation import MAX_NAME_LENGTH
from protos.v1 import queen_pb2
from queen.http.asgi import SSE_HEADERS, ClientGone, send_body, send_start, until_disconnect
from queen.http.dashboard import forms, local
from queen.http.dashboard.gate import Gate, Verdict
from queen.http.dashboard.live import Live, Stream
from queen.http.dashboard.series import Series
from queen.http.errors import ApiError
from queen.http.json_body import body_problem
from queen.rpc.admin import QueenAdminService
from queen.rpc.queen import QueenService

log = structlog.get_logger("queen.http.dashboard")

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
MAX_BODY = 64 * 1024
MAX_LISTED = 500
SNAPSHOT_AGE = 1.0
# The page runs only its own files, is never framed, and talks only to this queen.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
DATA_HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff"}


def data(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status, headers=DATA_HEADERS)


def bad_input(error: forms.BadInput) -> ApiError:
    return ApiError(400, error.message, "invalid_request_error", "invalid_value", error.param)


class Dashboard:
    def __init__(
        self, service: QueenService, admin: QueenAdminService, verdict: Verdict,
        tokens_enabled: bool,
    ) -> None:  # fmt: skip
        self.service, self.admin = service, admin
        cluster = service.cluster
        self.clock = cluster.clock
        # The chart's points, from every request's end from now on.
        series = Series()
        cluster.metrics.on_finished.append(series.ended)
        self.live = Live(series, cluster.events, cluster.desk, cluster.clock)
        self.gate = Gate(verdict, tokens_enabled)
        self.page = (STATIC / "index.html").read_bytes()
        self.assets = {name: (STATIC / name).read_bytes() for name in ASSETS}
        self._snapshot: tuple[float, dict[str, Any]] | None = None

    def allow(self, request: Request, rpc: str, write: bool = False) -> None:
        self.gate.check(rpc, request.headers, request.url.scheme, write)

    # ---- the page ---------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.assets:
            raise ApiError(404, f"no such dashboard file {name[:60]!r}", code="not_found")
        return Response(self.assets[name], media_type=ASSETS[name], headers=PAGE_HEADERS)

    # ---- data -------------------------------------------------------------

    async def cluster(self, request: Request) -> Response:
        """Hives, workers, models and the queen's status, as one snapshot."""
        self.allow(request, "ListWorkers")
        now = time.monotonic()
        if self._snapshot is None or now - self._snapshot[0] > SNAPSHOT_AGE:
            self._snapshot = (now, await self.snapshot())
        return data(self._snapshot[1])

    async def snapshot(self) -> dict[str, Any]:
        hives = await local.call(self.admin.ListHives, queen_pb2.ListHivesRequest())
        workers = await local.call(self.admin.ListWorkers, queen_pb2.ListWorkersRequest())
        models = await local.call(self.service.ListModels, queen_pb2.ListModelsRequest())
        return {
            "time": self.clock.time(),
            "tokens": self.gate.tokens_enabled,
            "queen": forms.to_json(hives.queen),
            "hives": [forms.to_json(hive) for hive in hives.hives[:MAX_LISTED]],
            "hives_total": len(hives.hives),
            "workers": [forms.to_json(worker) for worker in workers.workers[:MAX_LISTED]],
            "workers_total": len(workers.workers),
            "models": [forms.to_json(model) for model in models.models[:MAX_LISTED]],
        }

    async def series(self, request: Request) -> Response:
        self.allow(request, "Series")
        series = self.live.series
        return data({
            "interval": series.interval,
            "span": series.interval * (series.points.maxlen or 0),
            "now": self.clock.time(),
            "points": [point.as_json() for point in series.points],
        })  # fmt: skip

    async def requests(self, request: Request) -> Response:
        self.allow(request, "ListRequests")
        try:
            wanted = forms.requests_filter(request.query_params)
        except forms.BadInput as error:
            raise bad_input(error) from None
        reply = await local.call(self.admin.ListRequests, wanted)
        return data({"requests": [forms.to_json(record) for record in reply.requests]})

    async def stream(self, request: Request) -> Response:
        self.allow(request, "WatchEvents")
        stream = self.live.open()
        if stream is None:
            raise ApiError(429, f"{self.live.max_streams} dashboard streams are open already; "
                           "close a dashboard tab", "rate_limit_error", "too_many_streams",
                           headers={"Retry-After": "5"})  # fmt: skip
        return EventStream(self.live, stream)

    # ---- actions ----------------------------------------------------------

    async def act(
        self, request: Request, rpc: str, run: Callable[[object], Awaitable[dict[str, Any]]]
    ) -> Response:
        """One action: gate, body, the RPC; the listing snapshot is stale after it."""
        self.allow(request, rpc, write=True)
        for name, value in request.path_params.items():
            if not value or len(value) > MAX_NAME_LENGTH:
                raise ApiError(400, f"{name} must be 1..{MAX_NAME_LENGTH} characters",
                               code="invalid_value", param=name)  # fmt: skip
        body = await read_json(request)
        try:
            answer = await run(body)
        except forms.BadInput as error:
            raise bad_input(error) from None
        finally:
            self._snapshot = None
        log.info("dashboard action", rpc=rpc, target=request.path_params or None)
        return data(answer)

    def drain_hive(self, undrain: bool) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            async def run(_: object) -> dict[str, Any]:
                asked = queen_pb2.DrainHiveRequest(
                    hive_id=request.path_params["hive_id"], undrain=undrain
                )
                return {"hive": forms.to_json((await local.call(self.admin.DrainHive, asked)).hive)}

            return await self.act(request, "DrainHive", run)

        return endpoint

    def drain_worker(self, undrain: bool) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            async def run(_: object) -> dict[str, Any]:
                asked = queen_pb2.DrainWorkerRequest(
                    worker_id=request.path_params["worker_id"], undrain=undrain
                )
                reply = await local.call(self.admin.DrainWorker, asked)
                return {"worker": forms.to_json(reply.worker)}

            return await self.act(request, "DrainWorker", run)

        return endpoint

    async def retire_worker(self, request: Request) -> Response:
        worker_id = request.path_params["worker_id"]

        async def run(body: object) -> dict[str, Any]:
            asked = queen_pb2.RetireWorkerRequest(worker_id=worker_id, force=forms.force(body))
            reply = await local.call(self.admin.RetireWorker, asked, local.ACTION_TIMEOUT)
            return {"worker": forms.to_json(reply.worker)}

        return await self.act(request, "RetireWorker", run)

    async def spawn_worker(self, request: Request) -> Response:
        async def run(body: object) -> dict[str, Any]:
            asked = forms.spawn_request(body)
            reply = await local.call(self.admin.SpawnWorker, asked, local.ACTION_TIMEOUT)
            return {"worker": forms.to_json(reply.worker)}

        return await self.act(request, "SpawnWorker", run)

    # ---- the application --------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """`/`, `/static/NAME` and the API under `/api/` (its own app: its errors are the
        dashboard's, in the OpenAI error shape the front's are)."""
        hive, worker = "/hives/{hive_id:path}/", "/workers/{worker_id:path}/"
        api = Starlette(
            routes=[
                Route("/cluster", self.cluster, methods=["GET"]),
                Route("/series", self.series, methods=["GET"]),
                Route("/requests", self.requests, methods=["GET"]),
                Route("/stream", self.stream, methods=["GET"]),
                Route("/workers", self.spawn_worker, methods=["POST"]),
                Route(hive + "drain", self.drain_hive(False), methods=["POST"]),
                Route(hive + "undrain", self.drain_hive(True), methods=["POST"]),
                Route(worker + "drain", self.drain_worker(False), methods=["POST"]),
                Route(worker + "undrain", self.drain_worker(True), methods=["POST"]),
                Route(worker + "retire", self.retire_worker, methods=["POST"]),
            ],
            exception_handlers=ERROR_HANDLERS,
        )
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/static/{name}", self.asset, methods=["GET"]),
            Mount("/api", app=api),
        ]


class EventStream(Response):
    """The page's server-sent events until it goes away or the queen stops; either way its
    subscription ends with the response."""

    def __init__(self, live: Live, stream: Stream) -> None:
        self.live, self.events = live, stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(receive, self.send_all(send))
        except ClientGone:
            pass
        finally:
            self.live.close(self.events)

    async def send_all(self, send: Send) -> None:
        await send_start(send, 200, "text/event-stream", {**SSE_HEADERS, **DATA_HEADERS})
        async for chunk in self.events.messages():
            await send_body(send, chunk)
        await send_body(send, b"", last=True)


async def read_json(request: Request) -> object:
    """The body as JSON (an empty body: None), at most MAX_BODY bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and (len(length) > 18 or int(length) > MAX_BODY):
        raise ApiError(413, f"the body is larger than {MAX_BODY} bytes", code="too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY} bytes", code="too_large")
    if not body.strip():
        return None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the body is not valid JSON (or nests too deep)",
                       code="invalid_json") from None  # fmt: skip
    problem = body_problem(value)
    if problem is not None:
        raise ApiError(400, problem[0], param=problem[1])
    return value


def api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), exc.status, headers={**DATA_HEADERS, **exc.headers})


def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = ApiError(404, f"no such dashboard endpoint {request.url.path[:200]}",
                         code="not_found")  # fmt: skip
    else:
        error = ApiError(exc.status_code, f"{request.method} is not allowed on "
                         f"{request.url.path[:200]}", code="method_not_allowed",
                         headers=dict(exc.headers or {}))  # fmt: skip
    return api_error(request, error)


def server_error(request: Request, exc: Exception) -> Response:
    """A bug of ours: its traceback in the log, a plain 500 for the page."""
    log.exception("dashboard error", path=request.url.path, exc_info=exc)
    return api_error(request, ApiError(500, "internal error in the queen's dashboard",
                                       "server_error"))  # fmt: skip


ERROR_HANDLERS: dict[Any, Callable[[Request, Exception], Response]] = {
    ApiError: api_error, HTTPException: http_error, Exception: server_error,
}  # fmt: skip
