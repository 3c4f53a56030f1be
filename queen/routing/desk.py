"""Waiting for a slot: a bounded FIFO per model in front of the registry's slots.

A freed slot is handed straight to the oldest waiter that it suits, so a new
request never overtakes one that has been waiting for the same kind of worker.
A cache-aware request may decline free workers to wait for a busy one holding its prompt's
prefix; it does so for at most `cache_wait` seconds, and meanwhile does not hold back
requests behind it that would take the free workers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from protos.v1 import common_pb2
from queen.routing.prefix_index import Want
from queen.registry import Outcome, Registry, Slot

# Seconds a cache-aware request waits for a busy worker holding its prefix (--cache-wait).
DEFAULT_CACHE_WAIT = 1.0


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
    want: Want | None = None
    # Until when (loop time) it may decline free workers to wait for a holder of its prefix.
    affinity_until: float = 0.0

    def take(self, registry: Registry, model: str, now: float) -> Slot | None:
        return registry.take_slot(model, self.exclude, self.policy, self.tags, self.want,
                                  affinity=now < self.affinity_until)  # fmt: skip


class Scheduler:
    def __init__(
        self,
        registry: Registry,
        max_queue: int = 1024,
        expecting: Callable[[str], bool] = lambda model: False,
        cache_wait: float = DEFAULT_CACHE_WAIT,
    ) -> None:
        self.registry = registry
        self.max_queue = max_queue
        self.cache_wait = cache_wait
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
        want: Want | None = None,
    ) -> Slot | None:
        """A slot at once, or None, without queueing (and without overtaking waiters that
        would take any free worker)."""
        queue = self._waiters.get(model)
        if queue and any(not w.affinity_until for w in queue):
            return None
        return self.registry.take_slot(model, exclude, policy, tags, want)

    async def take_slot(
        self,
        model: str,
        timeout: float | None,
        exclude: frozenset[str] = frozenset(),
        policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED,
        tags: frozenset[str] = frozenset(),
        want: Want | None = None,
    ) -> Slot:
        """A slot on a free worker of `model`, waiting up to `timeout` seconds.

        Raises TimeoutError, QueueFull or ModelGone.
        """
        slot = self.try_take_slot(model, exclude, policy, tags, want)
        if slot is not None:
            return slot
        if self.queued >= self.max_queue:
            raise QueueFull(f"{self.queued} requests are already queued (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), exclude, policy, tags, want)
        wakeup = None
        if want is not None and self.registry.has_free(model):
            # Free workers were declined for a busy holder of the prefix: not for long.
            waiter.affinity_until = loop.time() + self.cache_wait
            wakeup = loop.call_later(self.cache_wait, self.dispatch, model)
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
            if wakeup is not None:
                wakeup.cancel()
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
        now = asyncio.get_running_loop().time()
        for waiter in list(queue):
            if not self.registry.has_free(model):
                return
            if waiter.future.done():
                queue.remove(waiter)
                continue
            slot = waiter.take(self.registry, model, now)
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
