"""Waiting for a condition with a deadline, and watching one hold for a window: the only polling
loops tests and benchmarks use, so none of them sleeps blindly and hopes.

A predicate may be sync or async. A `grpc.aio.AioRpcError` from it means "not yet" (the process
it asks is starting or restarting) while waiting, and "no longer" while watching.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import grpc

T = TypeVar("T")


class NotMet(AssertionError):
    """The condition did not come true in time; `last` is the predicate's last answer."""

    def __init__(self, message: str, last: object) -> None:
        super().__init__(message)
        self.last = last


class _Deadline:
    """The one rule every wait shares: a truthy answer ends it, an answer after the deadline
    fails it with that answer in the message."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.start = time.monotonic()

    def check(self, met: bool, last: object) -> bool:
        if met:
            return True
        if time.monotonic() - self.start > self.timeout:
            raise NotMet(f"condition not met within {self.timeout}s (last: {last!r})", last)
        return False


async def _ask(predicate: Callable[[], Any]) -> tuple[bool, object]:
    """(whether the predicate holds, its answer or the RPC error it raised)."""
    try:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
    except grpc.aio.AioRpcError as exc:
        return False, exc
    return bool(value), value


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T | None]], timeout: float = 10.0, interval: float = 0.02
) -> T: ...


@overload
async def wait_until(
    predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02
) -> T: ...


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll `predicate` until it returns something truthy and return that; raise `NotMet` with
    its last answer once `timeout` seconds have passed."""
    deadline = _Deadline(timeout)
    while True:
        met, last = await _ask(predicate)
        if deadline.check(met, last):
            return last
        await asyncio.sleep(interval)


def wait_until_sync(predicate: Callable[[], T | None], timeout: float, interval: float = 0.01) -> T:
    """`wait_until` for code that cannot await (starting a process from a sync helper)."""
    deadline = _Deadline(timeout)
    while True:
        last = predicate()
        if deadline.check(bool(last), last):
            assert last is not None
            return last
        time.sleep(interval)


async def stays_true(predicate: Callable[[], Any], seconds: float, interval: float = 0.05) -> None:
    """An observation window, not a wait: `predicate` must hold throughout the next `seconds`
    (checking that something does NOT happen for a while); fails as soon as it does not."""
    start = time.monotonic()
    while True:
        held, last = await _ask(predicate)
        elapsed = time.monotonic() - start
        if not held:
            raise AssertionError(
                f"stopped holding after {elapsed:.2f}s of a {seconds}s window (last: {last!r})"
            )
        if elapsed >= seconds:
            return
        await asyncio.sleep(min(interval, seconds - elapsed))
