"""`Client` and `Admin`: the blocking client. Each method is AsyncClient's (AsyncAdmin's), run
on a private event loop thread (the loop its channels belong to) and waited for: one
implementation of every behaviour. The methods are made from the async ones (`blocking`,
`blocking_stream`), so type checkers see the async signatures with the results they block for;
streams become plain iterators."""

from __future__ import annotations

import asyncio
import functools
import threading
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload

from apiary.client.admin import AsyncAdmin
from apiary.client.aio import AsyncClient
from apiary.client.queens import DEFAULT_TIMEOUT

Result = TypeVar("Result")
Params = ParamSpec("Params")
Async = TypeVar("Async")
Made = TypeVar("Made")


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


class OnLoop(Generic[Async]):
    """A blocking face of an `Async` object: its `blocking` methods run `Async`'s on `thread`'s
    loop."""

    def __init__(self, inner: Async, thread: LoopThread) -> None:
        self._async, self._thread = inner, thread


class Blocking(Generic[Async, Params, Made, Result]):
    """A method of OnLoop[Async]: `Async.method` with the same parameters, whose result
    (`Made`: a coroutine, a stream) `finish` turns on the loop thread into a blocking one.
    Made by `blocking` and `blocking_stream`, in a class body."""

    def __init__(
        self,
        method: Callable[Concatenate[Async, Params], Made],
        finish: Callable[[LoopThread, Made], Result],
    ) -> None:
        self._method, self._finish = method, finish
        self.__doc__ = method.__doc__

    def __repr__(self) -> str:
        return f"Blocking({self._method.__qualname__})"

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, instance: OnLoop[Async], owner: type[Any]) -> Callable[Params, Result]: ...
    def __get__(
        self, instance: OnLoop[Async] | None, owner: type[Any]
    ) -> Self | Callable[Params, Result]:
        if instance is None:
            return self
        method, finish = self._method, self._finish

        @functools.wraps(method)  # its name, docstring and (help) signature
        def call(face: OnLoop[Async], *args: Params.args, **kwargs: Params.kwargs) -> Result:
            return finish(face._thread, method(face._async, *args, **kwargs))

        return types.MethodType(call, instance)


def blocking(
    method: Callable[Concatenate[Async, Params], Coroutine[Any, Any, Result]],
) -> Blocking[Async, Params, Coroutine[Any, Any, Result], Result]:
    """`list_models = blocking(AsyncClient.list_models)`: run on the loop and waited for."""
    return Blocking(method, LoopThread.run)


def blocking_stream(
    method: Callable[Concatenate[Async, Params], AsyncIterator[Result]],
) -> Blocking[Async, Params, AsyncIterator[Result], Iterator[Result]]:
    """`infer = blocking_stream(AsyncClient.infer)`: a plain iterator, each step on the loop."""
    return Blocking(method, LoopThread.iterate)


class Client(OnLoop[AsyncClient]):
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
        inner = AsyncClient(
            queens, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
            timeout=timeout, wait_for_ready=wait_for_ready,
        )  # fmt: skip
        super().__init__(inner, LoopThread())
        self.queens = inner.queens
        self.timeout = inner.timeout
        self.admin = Admin(inner.admin, self._thread)

    def __repr__(self) -> str:
        return f"Client({','.join(self.queens)!r}, timeout={self.timeout:g})"

    def close(self) -> None:
        self._thread.stop(self._async.close())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    infer = blocking_stream(AsyncClient.infer)
    chat = blocking_stream(AsyncClient.chat)
    send = blocking_stream(AsyncClient.send)
    list_models = blocking(AsyncClient.list_models)
    embed = blocking(AsyncClient.embed)
    lease = blocking(AsyncClient.lease)
    release_lease = blocking(AsyncClient.release_lease)
    infer_direct = blocking_stream(AsyncClient.infer_direct)


class Admin(OnLoop[AsyncAdmin]):
    """`Client.admin`: AsyncAdmin's calls, blocking."""

    list_hives = blocking(AsyncAdmin.list_hives)
    get_hive = blocking(AsyncAdmin.get_hive)
    drain_hive = blocking(AsyncAdmin.drain_hive)
    list_workers = blocking(AsyncAdmin.list_workers)
    get_worker = blocking(AsyncAdmin.get_worker)
    spawn_worker = blocking(AsyncAdmin.spawn_worker)
    retire_worker = blocking(AsyncAdmin.retire_worker)
    drain_worker = blocking(AsyncAdmin.drain_worker)
    watch_events = blocking_stream(AsyncAdmin.watch_events)
    list_requests = blocking(AsyncAdmin.list_requests)
    list_catalog = blocking(AsyncAdmin.list_catalog)
    get_catalog_model = blocking(AsyncAdmin.get_catalog_model)
    delete_catalog_model = blocking(AsyncAdmin.delete_catalog_model)
    pull_model = blocking_stream(AsyncAdmin.pull_model)
    list_processes = blocking(AsyncAdmin.list_processes)
    get_process = blocking(AsyncAdmin.get_process)
    kill_process = blocking(AsyncAdmin.kill_process)
    list_backends = blocking(AsyncAdmin.list_backends)
    get_backend = blocking(AsyncAdmin.get_backend)
