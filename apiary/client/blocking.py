"""`Client`: the blocking client. Each method runs AsyncClient's on a private event loop thread
(the loop its channels belong to) and waits: one implementation of every behaviour, with
signatures of its own so type checkers see real types; streams become plain iterators."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from typing import Any, TypeVar, Unpack

from apiary.client.admin import AsyncAdmin
from apiary.client.aio import AsyncClient
from apiary.client.queens import DEFAULT_TIMEOUT
from apiary.client.requests import InferOptions, Message
from protos.v1 import common_pb2, hive_pb2, queen_pb2

Result = TypeVar("Result")


class _End:
    """A stream ended (StopAsyncIteration may not cross a future)."""


class LoopThread:
    """An event loop on a daemon thread; other threads hand it coroutines and wait."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="apiary-client", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Result]) -> Result:
        """Run `coroutine` on the loop and wait for it; interrupted (Ctrl-C), it is cancelled."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a blocking Client called from its own loop: use AsyncClient")
        if not self.loop.is_running():
            coroutine.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def iterate(self, stream: AsyncIterator[Result]) -> Iterator[Result]:
        """`stream`'s items, one blocking step at a time. A consumer that stops early (break,
        an exception) closes it, and so cancels its call; a step that fails or is interrupted
        has ended it already."""
        while not isinstance(item := self.run(_next(stream)), _End):
            try:
                yield item
            except BaseException:
                if self.loop.is_running():
                    self.run(_close(stream))
                raise

    def stop(self, last: Coroutine[Any, Any, None]) -> None:
        """Run `last` (closing channels), then stop the loop and its thread."""
        if not self.loop.is_running():
            last.close()
            return
        try:
            self.run(last)
            self.run(self.loop.shutdown_asyncgens())  # streams left open end here
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            if not self.loop.is_running():
                self.loop.close()


async def _next(stream: AsyncIterator[Result]) -> Result | _End:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _End()


async def _close(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


class Client:
    """The blocking client of a cluster: AsyncClient's options and calls, for code without an
    event loop (safe to share between threads). Close it (or use `with`).

    Failures are grpc's `grpc.aio.AioRpcError` (`.code()`, `.details()`), as AsyncClient's.
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
        # Made here (files read, queens checked) but its channels are made on the loop.
        self._async = AsyncClient(
            queens, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
            timeout=timeout, wait_for_ready=wait_for_ready,
        )  # fmt: skip
        self._thread = LoopThread()
        self.queens = self._async.queens
        self.timeout = timeout
        self.admin = Admin(self._async.admin, self._thread)

    def __repr__(self) -> str:
        return f"Client({','.join(self.queens)!r}, timeout={self.timeout:g})"

    def close(self) -> None:
        self._thread.stop(self._async.close())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def infer(
        self,
        model: str,
        prompt: str,
        *,
        timeout: float | None = None,
        **options: Unpack[InferOptions],
    ) -> Iterator[common_pb2.InferChunk]:
        """Stream a completion of `prompt` (AsyncClient.infer)."""
        return self._thread.iterate(self._async.infer(model, prompt, timeout=timeout, **options))

    def chat(
        self,
        model: str,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        **options: Unpack[InferOptions],
    ) -> Iterator[common_pb2.InferChunk]:
        """Stream the assistant's reply to `messages` (AsyncClient.chat)."""
        stream = self._async.chat(model, messages, timeout=timeout, **options)
        return self._thread.iterate(stream)

    def send(
        self, request: common_pb2.InferRequest, *, timeout: float | None = None
    ) -> Iterator[common_pb2.InferChunk]:
        return self._thread.iterate(self._async.send(request, timeout=timeout))

    def list_models(self, *, timeout: float | None = None) -> list[queen_pb2.ModelInfo]:
        return self._thread.run(self._async.list_models(timeout=timeout))

    def lease(
        self,
        model: str,
        *,
        required_tags: Iterable[str] = (),
        policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED,
        ttl_seconds: float = 0.0,
        timeout: float | None = None,
    ) -> queen_pb2.LeaseResponse:
        """A slot on a worker for one infer_direct (AsyncClient.lease)."""
        return self._thread.run(
            self._async.lease(
                model, required_tags=required_tags, policy=policy, ttl_seconds=ttl_seconds,
                timeout=timeout,
            )
        )  # fmt: skip

    def release_lease(
        self, lease: queen_pb2.LeaseResponse | str, *, timeout: float | None = None
    ) -> None:
        self._thread.run(self._async.release_lease(lease, timeout=timeout))

    def infer_direct(
        self,
        lease: queen_pb2.LeaseResponse,
        request: common_pb2.InferRequest,
        *,
        timeout: float | None = None,
    ) -> Iterator[common_pb2.InferChunk]:
        """Stream `request` from the leased worker itself (AsyncClient.infer_direct)."""
        return self._thread.iterate(self._async.infer_direct(lease, request, timeout=timeout))


class Admin:
    """`Client.admin`: AsyncAdmin's calls, blocking."""

    def __init__(self, admin: AsyncAdmin, thread: LoopThread) -> None:
        self._async, self._thread = admin, thread

    def list_hives(self, *, timeout: float | None = None) -> queen_pb2.ListHivesResponse:
        return self._thread.run(self._async.list_hives(timeout=timeout))

    def get_hive(self, hive_id: str, *, timeout: float | None = None) -> queen_pb2.GetHiveResponse:
        return self._thread.run(self._async.get_hive(hive_id, timeout=timeout))

    def drain_hive(
        self, hive_id: str, *, undrain: bool = False, timeout: float | None = None
    ) -> queen_pb2.HiveInfo:
        return self._thread.run(self._async.drain_hive(hive_id, undrain=undrain, timeout=timeout))

    def list_workers(
        self,
        *,
        hive_id: str = "",
        model: str = "",
        state: common_pb2.WorkerState.ValueType = common_pb2.WORKER_STATE_UNSPECIFIED,
        tags: Iterable[str] = (),
        hive_health: common_pb2.HiveHealth.ValueType = common_pb2.HIVE_HEALTH_UNSPECIFIED,
        min_free_slots: int = 0,
        timeout: float | None = None,
    ) -> list[common_pb2.WorkerRecord]:
        return self._thread.run(
            self._async.list_workers(
                hive_id=hive_id, model=model, state=state, tags=tags, hive_health=hive_health,
                min_free_slots=min_free_slots, timeout=timeout,
            )
        )  # fmt: skip

    def get_worker(
        self, worker_id: str, *, timeout: float | None = None
    ) -> common_pb2.WorkerRecord:
        return self._thread.run(self._async.get_worker(worker_id, timeout=timeout))

    def spawn_worker(
        self,
        model: str,
        *,
        hive_id: str = "",
        backend: str = "",
        slots: int = 1,
        device: str = "",
        backend_options: Mapping[str, str] | None = None,
        wait_ready: bool = True,
        restart_policy: common_pb2.RestartPolicy.ValueType = common_pb2.RESTART_POLICY_UNSPECIFIED,
        tags: Iterable[str] = (),
        timeout: float | None = None,
    ) -> common_pb2.WorkerRecord:
        return self._thread.run(
            self._async.spawn_worker(
                model, hive_id=hive_id, backend=backend, slots=slots, device=device,
                backend_options=backend_options, wait_ready=wait_ready,
                restart_policy=restart_policy, tags=tags, timeout=timeout,
            )
        )  # fmt: skip

    def retire_worker(
        self, worker_id: str, *, force: bool = False, timeout: float | None = None
    ) -> common_pb2.WorkerRecord:
        return self._thread.run(self._async.retire_worker(worker_id, force=force, timeout=timeout))

    def drain_worker(
        self, worker_id: str, *, undrain: bool = False, timeout: float | None = None
    ) -> common_pb2.WorkerRecord:
        return self._thread.run(
            self._async.drain_worker(worker_id, undrain=undrain, timeout=timeout)
        )

    def watch_events(
        self,
        *,
        kinds: Iterable[queen_pb2.EventKind.ValueType] = (),
        timeout: float | None = None,
    ) -> Iterator[queen_pb2.Event]:
        return self._thread.iterate(self._async.watch_events(kinds=kinds, timeout=timeout))

    def list_requests(
        self,
        *,
        status: queen_pb2.RequestStatus.ValueType = queen_pb2.REQUEST_STATUS_UNSPECIFIED,
        model: str = "",
        limit: int = 0,
        timeout: float | None = None,
    ) -> list[queen_pb2.RequestRecord]:
        return self._thread.run(
            self._async.list_requests(status=status, model=model, limit=limit, timeout=timeout)
        )

    def list_catalog(
        self, *, hive_id: str = "", timeout: float | None = None
    ) -> list[hive_pb2.CatalogModel]:
        return self._thread.run(self._async.list_catalog(hive_id=hive_id, timeout=timeout))

    def get_catalog_model(
        self, name: str, *, hive_id: str = "", timeout: float | None = None
    ) -> hive_pb2.CatalogModel:
        return self._thread.run(
            self._async.get_catalog_model(name, hive_id=hive_id, timeout=timeout)
        )

    def delete_catalog_model(
        self, name: str, *, hive_id: str = "", timeout: float | None = None
    ) -> hive_pb2.CatalogModel:
        return self._thread.run(
            self._async.delete_catalog_model(name, hive_id=hive_id, timeout=timeout)
        )

    def pull_model(
        self,
        source: str,
        *,
        name: str = "",
        sha256: str = "",
        hive_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[hive_pb2.PullProgress]:
        stream = self._async.pull_model(
            source, name=name, sha256=sha256, hive_id=hive_id, timeout=timeout
        )
        return self._thread.iterate(stream)

    def list_processes(
        self, *, hive_id: str = "", timeout: float | None = None
    ) -> list[hive_pb2.WorkerProcess]:
        return self._thread.run(self._async.list_processes(hive_id=hive_id, timeout=timeout))

    def get_process(
        self, pid: int, *, hive_id: str = "", timeout: float | None = None
    ) -> hive_pb2.WorkerProcess:
        return self._thread.run(self._async.get_process(pid, hive_id=hive_id, timeout=timeout))

    def kill_process(
        self, pid: int, *, hive_id: str = "", timeout: float | None = None
    ) -> hive_pb2.WorkerProcess:
        return self._thread.run(self._async.kill_process(pid, hive_id=hive_id, timeout=timeout))

    def list_backends(
        self, *, hive_id: str = "", timeout: float | None = None
    ) -> list[hive_pb2.BackendInfo]:
        return self._thread.run(self._async.list_backends(hive_id=hive_id, timeout=timeout))

    def get_backend(
        self, name: str, *, hive_id: str = "", timeout: float | None = None
    ) -> hive_pb2.BackendInfo:
        return self._thread.run(self._async.get_backend(name, hive_id=hive_id, timeout=timeout))
