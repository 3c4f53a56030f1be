"""harness.wait: waits end on the first truthy answer or fail with the last one; observation
windows fail as soon as the condition stops holding."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from harness.wait import NotMet, stays_true, wait_until, wait_until_sync


async def test_wait_until_returns_the_first_truthy_answer_of_sync_and_async_predicates() -> None:
    answers: Iterator[object] = iter([None, 0, [], "ready"])
    assert await wait_until(lambda: next(answers), timeout=1, interval=0) == "ready"

    calls = 0

    async def third_time() -> int | None:
        nonlocal calls
        calls += 1
        return calls if calls == 3 else None

    assert await wait_until(third_time, timeout=1, interval=0) == 3


async def test_wait_until_fails_with_the_last_answer() -> None:
    with pytest.raises(NotMet, match=r"within 0.05s \(last: \[\]\)") as err:
        await wait_until(lambda: [], timeout=0.05)
    assert err.value.last == []


async def test_an_rpc_error_is_not_yet() -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "starting", None
    )
    calls = 0

    async def flaky() -> bool:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise error
        return True

    assert await wait_until(flaky, timeout=1, interval=0) is True

    async def down() -> bool:
        raise error

    with pytest.raises(NotMet) as err:
        await wait_until(down, timeout=0.02)
    assert err.value.last is error


def test_wait_until_sync() -> None:
    answers = iter([None, None, 7])
    assert wait_until_sync(lambda: next(answers), timeout=1, interval=0) == 7
    with pytest.raises(NotMet):
        wait_until_sync(lambda: None, timeout=0.02)


async def test_stays_true_watches_the_whole_window_and_fails_at_once() -> None:
    start = time.monotonic()
    await stays_true(lambda: True, 0.1, interval=0.02)
    assert time.monotonic() - start >= 0.1
    start = time.monotonic()
    with pytest.raises(AssertionError, match="stopped holding"):
        await stays_true(lambda: time.monotonic() - start < 0.05, 5.0, interval=0.01)
    assert time.monotonic() - start < 1.0
