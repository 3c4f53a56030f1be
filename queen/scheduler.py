"""Waiting for a slot: a bounded FIFO per model in front of the registry's leases.

A freed slot is handed straight to the oldest waiter of its model, so a new
request can never overtake one that has been waiting.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from queen.registry import Lease, Registry


class QueueFull(Exception):
    pass


class ModelGone(Exception):
    """Every worker of the model left while the request waited."""


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[Lease]
    exclude: frozenset[str] = field(default_factory=frozenset)


class Scheduler:
    def __init__(self, registry: Registry, max_queue: int = 1024) -> None:
        self.registry = registry
        self.max_queue = max_queue
        self._waiters: dict[str, deque[_Waiter]] = {}
        self.queued = 0

    def queue_depth(self, model: str) -> int:
        return len(self._waiters.get(model, ()))

    async def acquire(
        self, model: str, timeout: float | None, exclude: frozenset[str] = frozenset()
    ) -> Lease:
        """A lease on a free worker of `model`, waiting up to `timeout` seconds.

        Raises TimeoutError, QueueFull or ModelGone.
        """
        if not self._waiters.get(model):
            lease = self.registry.acquire(model, exclude)
            if lease is not None:
                return lease
        if self.queued >= self.max_queue:
            raise QueueFull(f"{self.queued} requests are already queued (limit {self.max_queue})")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), exclude)
        queue = self._waiters.setdefault(model, deque())
        queue.append(waiter)
        self.queued += 1
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the result, leaving the caller holding a slot it will not use.
            async with asyncio.timeout(timeout):
                return await waiter.future
        except BaseException:
            if (
                waiter.future.done()
                and not waiter.future.cancelled()
                and not waiter.future.exception()
            ):
                # A slot was handed to us just as we gave up: pass it on, never leak it.
                self.release(waiter.future.result(), ok=None)
            waiter.future.cancel()
            raise
        finally:
            self.queued -= 1
            if waiter in queue:
                queue.remove(waiter)
            if not queue and self._waiters.get(model) is queue:
                del self._waiters[model]

    def release(self, lease: Lease, ok: bool | None) -> None:
        """Return a slot (ok: request succeeded / failed / None: never used) and wake a waiter."""
        self.registry.release(lease, ok)
        self.dispatch(lease.model)

    def dispatch(self, model: str) -> None:
        """Hand free slots of `model` to its waiters, oldest first."""
        queue = self._waiters.get(model)
        while queue:
            waiter = queue[0]
            if waiter.future.done():
                queue.popleft()
                continue
            if not self.registry.has_model(model):
                queue.popleft()
                waiter.future.set_exception(
                    ModelGone(f"every worker of model {model!r} left while the request waited")
                )
                continue
            lease = self.registry.acquire(model, waiter.exclude)
            if lease is None:
                return
            queue.popleft()
            waiter.future.set_result(lease)

    def dispatch_all(self) -> None:
        for model in list(self._waiters):
            self.dispatch(model)
