"""Waiting for a slot: a bounded FIFO per model in front of the registry's slots.

A freed slot is handed straight to the oldest waiter that it suits, so a new
request never overtakes one that has been waiting for the same kind of worker.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from protos.v1 import common_pb2
from queen.registry import Outcome, Registry, Slot


class QueueFull(Exception):
    pass


class ModelGone(Exception):
    """Every worker of the model left while the request waited."""


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[Slot]
    exclude: frozenset[str]
    policy: common_pb2.RoutingPolicy.ValueType
    tags: frozenset[str]


class Scheduler:
    def __init__(
        self,
        registry: Registry,
        max_queue: int = 1024,
        expecting: Callable[[str], bool] = lambda model: False,
    ) -> None:
        self.registry = registry
        self.max_queue = max_queue
        # True while a worker of the model is on its way (autospawn): waiters keep waiting.
        self.expecting = expecting
        self._waiters: dict[str, deque[_Waiter]] = {}
        self.queued = 0

    def queue_depth(self, model: str) -> int:
        return len(self._waiters.get(model, ()))

    def try_take_slot(
        self,
        model: str,
        exclude: frozenset[str] = frozenset(),
        policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED,
        tags: frozenset[str] = frozenset(),
    ) -> Slot | None:
        """A slot at once, or None, without queueing (and without overtaking waiters)."""
        if self._waiters.get(model):
            return None
        return self.registry.take_slot(model, exclude, policy, tags)

    async def take_slot(
        self,
        model: str,
        timeout: float | None,
        exclude: frozenset[str] = frozenset(),
        policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED,
        tags: frozenset[str] = frozenset(),
    ) -> Slot:
        """A slot on a free worker of `model`, waiting up to `timeout` seconds.

        Raises TimeoutError, QueueFull or ModelGone.
        """
        slot = self.try_take_slot(model, exclude, policy, tags)
        if slot is not None:
            return slot
        if self.queued >= self.max_queue:
            raise QueueFull(f"{self.queued} requests are already queued (limit {self.max_queue})")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), exclude, policy, tags)
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
                self.give_back(waiter.future.result(), Outcome(ok=None))
            waiter.future.cancel()
            raise
        finally:
            self.queued -= 1
            if waiter in queue:
                queue.remove(waiter)
            if not queue and self._waiters.get(model) is queue:
                del self._waiters[model]

    def give_back(self, slot: Slot, outcome: Outcome) -> None:
        """Return a slot, count how it went, and wake a waiter it suits."""
        self.registry.give_back(slot, outcome)
        self.dispatch(slot.model)

    def dispatch(self, model: str) -> None:
        """Hand free slots of `model` to its waiters, oldest first."""
        queue = self._waiters.get(model)
        if not queue:
            return
        if not self.registry.has_model(model) and not self.expecting(model):
            while queue:
                waiter = queue.popleft()
                if not waiter.future.done():
                    waiter.future.set_exception(
                        ModelGone(f"every worker of model {model!r} left while the request waited")
                    )
            return
        for waiter in list(queue):
            if not self.registry.has_free(model):
                return
            if waiter.future.done():
                queue.remove(waiter)
                continue
            slot = self.registry.take_slot(model, waiter.exclude, waiter.policy, waiter.tags)
            if slot is not None:
                queue.remove(waiter)
                waiter.future.set_result(slot)

    def fail(self, model: str, message: str) -> None:
        """End every wait for `model` with ModelGone(message) (e.g. its autospawn failed)."""
        queue = self._waiters.get(model)
        while queue:
            waiter = queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(ModelGone(message))

    def dispatch_all(self) -> None:
        for model in list(self._waiters):
            self.dispatch(model)
