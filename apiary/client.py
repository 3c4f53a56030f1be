"""The Python client of an Apiary cluster: `AsyncClient` (asyncio) and `Client` (blocking).

    from apiary.client import Client
    with Client("127.0.0.1:7070") as apiary:
        for chunk in apiary.chat("demo", [{"role": "user", "content": "hello bees"}]):
            print(chunk.text, end="")

Every call has a deadline (the client's `timeout` unless given). Given several queens
("10.0.0.1:7070,10.0.0.2:7070"), a call that cannot reach one tries the next, and a stream
moves to another queen as long as no chunk has arrived; when every queen is briefly down
(a restart) the client keeps trying until the deadline instead of failing at once.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import grpc

from apiary.security import Security, TlsFiles
from protos.v1 import common_pb2, hive_pb2, queen_pb2, queen_pb2_grpc, worker_pb2_grpc

QUEEN_ENV = "APIARY_QUEEN"
DEFAULT_QUEEN = "127.0.0.1:7070"
DEFAULT_TIMEOUT = 60.0
# A client's channels reconnect quickly: a queen coming back is found within a second.
CLIENT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
# What grpc says when the call never reached a server (so it is safe to send elsewhere),
# and what a queen says when it stops taking requests.
UNREACHED = (
    "failed to connect",
    "connection refused",
    "socket closed",
    "connect failed",
    "dns resolution",
    "queen shutting down",
    "no route to host",
    "unreachable",
)

T = TypeVar("T")
Message = Mapping[str, str] | common_pb2.ChatMessage


def queens_from(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """'A,B' or ['A', 'B'], else $APIARY_QUEEN, else 127.0.0.1:7070."""
    if value is None:
        value = os.environ.get(QUEEN_ENV, DEFAULT_QUEEN)
    parts = value.split(",") if isinstance(value, str) else list(value)
    queens = tuple(p.strip() for p in parts if p.strip())
    if not queens:
        raise ValueError("no queen address given")
    return queens


def unreached(exc: grpc.RpcError) -> bool:
    """The call did not get to a queen that would serve it: another queen may."""
    if not isinstance(exc, grpc.aio.AioRpcError | grpc.Call):
        return False
    details = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNAVAILABLE and any(u in details for u in UNREACHED)


def infer_request(model: str, prompt: str = "", messages: Iterable[Message] = (),
                  max_tokens: int = 0, **options: Any) -> common_pb2.InferRequest:  # fmt: skip
    """An InferRequest; `options` are its other fields (temperature, stop, request_id, ...)."""
    chat = [m if isinstance(m, common_pb2.ChatMessage) else common_pb2.ChatMessage(**m)
            for m in messages]  # fmt: skip
    fields = {k: v for k, v in options.items() if v is not None}
    return common_pb2.InferRequest(
        model=model, prompt=prompt, messages=chat, max_tokens=max_tokens, **fields
    )


class AsyncClient:
    """One client of a cluster (one or several queens), on the running event loop."""

    def __init__(
        self,
        queens: str | Iterable[str] | None = None,
        *,
        token: str | None = None,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.queens = queens_from(queens)
        self.token = os.environ.get("APIARY_TOKEN", "") if token is None else token
        self.security = Security(tls=TlsFiles(cert=tls_cert, key=tls_key, ca=tls_ca))
        self.timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._preferred = 0
        self.admin = AsyncAdmin(self)

    # ---- plumbing -----------------------------------------------------------

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self.security.aio_channel(address, self.token, CLIENT_OPTIONS)
            self._channels[address] = channel
        return channel

    def _rotation(self) -> list[str]:
        """The queen that answered last first, then the others in order."""
        n = len(self.queens)
        return [self.queens[(self._preferred + i) % n] for i in range(n)]

    def _answered(self, address: str) -> None:
        self._preferred = self.queens.index(address)

    async def unary(
        self, call: Callable[[grpc.aio.Channel, float], Awaitable[T]], timeout: float | None = None
    ) -> T:
        """`call(channel, time_left)` on the first queen that can take it, until the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        pause = 0.05
        while True:
            last: grpc.RpcError | None = None
            for address in self._rotation():
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    result = await call(self.channel(address), left)
                except grpc.aio.AioRpcError as exc:
                    if not unreached(exc):
                        raise
                    last = exc
                    continue
                self._answered(address)
                return result
            pause = await self._pause_or_give_up(deadline, pause, last)

    async def _pause_or_give_up(
        self, deadline: float, pause: float, last: grpc.RpcError | None
    ) -> float:
        """Every queen was unreachable: wait a little (a restart), unless the deadline came."""
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            if last is not None:
                raise last
            raise TimeoutError("deadline passed before any queen answered")
        await asyncio.sleep(min(pause, left))
        return min(pause * 2, 1.0)

    async def stream(
        self,
        open_stream: Callable[[grpc.aio.Channel, float], Any],
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """A server stream from the first queen that can take it; it moves to another queen
        only while nothing has arrived (after that, a failure is the caller's to see)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        pause = 0.05
        while True:
            last: grpc.RpcError | None = None
            for address in self._rotation():
                left = deadline - loop.time()
                if left <= 0:
                    break
                call = open_stream(self.channel(address), left)
                received = False
                try:
                    async for item in call:
                        received = True
                        yield item
                    self._answered(address)
                    return
                except grpc.aio.AioRpcError as exc:
                    if received or not unreached(exc):
                        raise
                    last = exc
                finally:
                    call.cancel()
            pause = await self._pause_or_give_up(deadline, pause, last)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # ---- inference ----------------------------------------------------------

    def infer(
        self, model: str, prompt: str, max_tokens: int = 0, *, timeout: float | None = None,
        **options: Any,
    ) -> AsyncIterator[common_pb2.InferChunk]:  # fmt: skip
        """Stream a completion of `prompt` (max_tokens 0: the queen's default)."""
        return self.send(infer_request(model, prompt, (), max_tokens, **options), timeout)

    def chat(
        self, model: str, messages: Iterable[Message], max_tokens: int = 0, *,
        timeout: float | None = None, **options: Any,
    ) -> AsyncIterator[common_pb2.InferChunk]:  # fmt: skip
        """Stream the assistant's reply to `messages` ({"role": ..., "content": ...})."""
        return self.send(infer_request(model, "", messages, max_tokens, **options), timeout)

    def send(
        self, request: common_pb2.InferRequest, timeout: float | None = None
    ) -> AsyncIterator[common_pb2.InferChunk]:
        return self.stream(
            lambda ch, left: queen_pb2_grpc.QueenStub(ch).Infer(request, timeout=left), timeout
        )

    async def list_models(self) -> list[queen_pb2.ModelInfo]:
        reply = await self.unary(
            lambda ch, left: queen_pb2_grpc.QueenStub(ch).ListModels(
                queen_pb2.ListModelsRequest(), timeout=left
            )
        )
        return list(reply.models)

    # ---- direct leases ------------------------------------------------------

    async def lease(self, request: queen_pb2.LeaseRequest) -> queen_pb2.LeaseResponse:
        """A slot on a worker, to call it directly (infer_direct); give it back if unused."""
        return await self.unary(
            lambda ch, left: queen_pb2_grpc.QueenStub(ch).Lease(request, timeout=left)
        )

    async def release_lease(self, lease_id: str) -> None:
        release = queen_pb2.ReleaseLeaseRequest(lease_id=lease_id)
        await self.unary(
            lambda ch, left: queen_pb2_grpc.QueenStub(ch).ReleaseLease(release, timeout=left)
        )

    async def infer_direct(
        self, lease: queen_pb2.LeaseResponse, request: common_pb2.InferRequest,
        timeout: float | None = None,
    ) -> AsyncIterator[common_pb2.InferChunk]:  # fmt: skip
        """Call the leased worker yourself: the queen is out of the token stream."""
        direct = common_pb2.InferRequest()
        direct.CopyFrom(request)
        direct.lease_id = lease.lease_id
        stub = worker_pb2_grpc.WorkerStub(self.channel(lease.address))
        async for chunk in stub.Infer(direct, timeout=self.timeout if timeout is None else timeout):
            yield chunk


class AsyncAdmin:
    """The QueenAdmin calls (an admin token): hives, workers, drains, events, history, and each
    hive's catalog, processes and backends through the queen."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return await self.client.unary(
            lambda ch, left: getattr(queen_pb2_grpc.QueenAdminStub(ch), method)(
                request, timeout=left
            ),
            timeout,
        )

    def call_stream(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return self.client.stream(
            lambda ch, left: getattr(queen_pb2_grpc.QueenAdminStub(ch), method)(
                request, timeout=left
            ),
            timeout,
        )

    async def list_hives(self) -> list[queen_pb2.HiveInfo]:
        return list((await self.call("ListHives", queen_pb2.ListHivesRequest())).hives)

    async def get_hive(self, hive_id: str) -> queen_pb2.GetHiveResponse:
        reply: queen_pb2.GetHiveResponse = await self.call(
            "GetHive", queen_pb2.GetHiveRequest(hive_id=hive_id)
        )
        return reply

    async def list_workers(self, **filters: Any) -> list[common_pb2.WorkerRecord]:
        request = queen_pb2.ListWorkersRequest(**filters)
        return list((await self.call("ListWorkers", request)).workers)

    async def get_worker(self, worker_id: str) -> common_pb2.WorkerRecord:
        reply = await self.call("GetWorker", queen_pb2.GetWorkerRequest(worker_id=worker_id))
        worker: common_pb2.WorkerRecord = reply.worker
        return worker

    async def spawn_worker(
        self, request: queen_pb2.QueenSpawnWorkerRequest, timeout: float | None = None
    ) -> common_pb2.WorkerRecord:
        worker: common_pb2.WorkerRecord = (await self.call("SpawnWorker", request, timeout)).worker
        return worker

    async def retire_worker(
        self, worker_id: str, force: bool = False, timeout: float | None = None
    ) -> common_pb2.WorkerRecord:
        request = queen_pb2.RetireWorkerRequest(worker_id=worker_id, force=force)
        worker: common_pb2.WorkerRecord = (await self.call("RetireWorker", request, timeout)).worker
        return worker

    async def drain_hive(self, hive_id: str, undrain: bool = False) -> queen_pb2.HiveInfo:
        request = queen_pb2.DrainHiveRequest(hive_id=hive_id, undrain=undrain)
        hive: queen_pb2.HiveInfo = (await self.call("DrainHive", request)).hive
        return hive

    async def drain_worker(self, worker_id: str, undrain: bool = False) -> common_pb2.WorkerRecord:
        request = queen_pb2.DrainWorkerRequest(worker_id=worker_id, undrain=undrain)
        worker: common_pb2.WorkerRecord = (await self.call("DrainWorker", request)).worker
        return worker

    def watch_events(
        self, kinds: Iterable[int] = (), timeout: float | None = None
    ) -> AsyncIterator[queen_pb2.Event]:
        request = queen_pb2.WatchEventsRequest(kinds=list(kinds))  # type: ignore[arg-type]
        stream: AsyncIterator[queen_pb2.Event] = self.call_stream("WatchEvents", request, timeout)
        return stream

    async def list_requests(self, **filters: Any) -> list[queen_pb2.RequestRecord]:
        request = queen_pb2.ListRequestsRequest(**filters)
        return list((await self.call("ListRequests", request)).requests)

    async def on_hive(self, method: str, hive_id: str = "", **fields: Any) -> Any:
        """A hive call through the queen: ListCatalog, GetCatalogModel, DeleteCatalogModel,
        ListProcesses, GetProcess, KillProcess, ListBackends, GetBackend."""
        request_type = {
            "GetCatalogModel": queen_pb2.HiveModelRequest,
            "DeleteCatalogModel": queen_pb2.HiveModelRequest,
            "GetProcess": queen_pb2.HiveProcessRequest,
            "KillProcess": queen_pb2.HiveProcessRequest,
            "GetBackend": queen_pb2.HiveBackendRequest,
        }.get(method, queen_pb2.HiveRequest)
        return await self.call(method, request_type(hive_id=hive_id, **fields))

    def pull_model(
        self, pull: hive_pb2.PullModelRequest, hive_id: str = "", timeout: float | None = None
    ) -> AsyncIterator[hive_pb2.PullProgress]:
        request = queen_pb2.HivePullRequest(hive_id=hive_id, pull=pull)
        stream: AsyncIterator[hive_pb2.PullProgress] = self.call_stream(
            "PullModel", request, timeout
        )
        return stream


class Client:
    """The blocking client: the same calls as AsyncClient, on a private event loop thread.

    Methods return what AsyncClient's return; streams are plain iterators.
    """

    def __init__(self, queens: str | Iterable[str] | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._async: AsyncClient = self._run(_make(queens, options))
        self.queens = self._async.queens
        self.admin = _Blocking(self, self._async.admin)

    def _run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_await(coro), self._loop).result()

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(anext(stream))
                except StopAsyncIteration:
                    return
        finally:
            self._run(_close(stream))

    def __getattr__(self, name: str) -> Any:
        return _Blocking(self, self._async).wrap(getattr(self._async, name))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _Blocking:
    """Turns an async object's methods into blocking ones, run on the client's loop."""

    def __init__(self, client: Client, target: object) -> None:
        self.client, self.target = client, target

    def wrap(self, method: Any) -> Any:
        if not callable(method):
            return method

        def blocking(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if hasattr(result, "__anext__"):
                return self.client._iterate(result)
            if asyncio.iscoroutine(result):
                return self.client._run(result)
            return result

        return blocking

    def __getattr__(self, name: str) -> Any:
        return self.wrap(getattr(self.target, name))


async def _make(queens: str | Iterable[str] | None, options: dict[str, Any]) -> AsyncClient:
    return AsyncClient(queens, **options)  # channels belong to the loop that makes them


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _close(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
