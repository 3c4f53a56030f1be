"""The one door for routing: a request (an Infer's attempt, a lease) asks the desk for a slot,
and gets one or its final status.

Behind the door, a bounded FIFO per model in front of the router: a freed slot is handed
straight to the oldest waiter that it suits, so a new request never overtakes one that has
been waiting for the same kind of worker. A cache-aware request may decline free workers to
wait for a busy one holding its prompt's prefix; it does so for at most `cache_wait` seconds,
and meanwhile does not hold back requests behind it that would take the free workers.

Every wait is counted against the client's quota of waiting requests, lasts at most
--max-wait, and ends when the queen stops.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from apiary.errors import StatusError
from queen import stopping
from queen.quotas import Quota
from queen.routing.ask import Ask, Outcome, Slot
from queen.routing.router import Router

# Seconds a cache-aware request waits for a busy worker holding its prefix (--cache-wait).
DEFAULT_CACHE_WAIT = 1.0
# The longest a request waits for a free slot unless the queen is told otherwise (--max-wait):
# a client without a deadline (grpcurl's default) must not wait forever.
DEFAULT_MAX_WAIT = 300.0


class ModelGone(Exception):
    """Every worker of the model left while the request waited (or the wait was ended)."""


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[Slot]
    ask: Ask
    # Until when (loop time) it may decline free workers to wait for a holder of its prefix.
    affinity_until: float = 0.0


class Desk:
    def __init__(
        self,
        router: Router,
        max_queue: int = 1024,
        cache_wait: float = DEFAULT_CACHE_WAIT,
    ) -> None:
        self.router = router
        self.max_queue = max_queue
        self.cache_wait = cache_wait
        # The service's limits on waits (see limit): none until it says.
        self.max_wait = DEFAULT_MAX_WAIT
        self.queued_quota = Quota("requests waiting", "", 0, "")
        # Wired by the cluster: a worker of the model is on its way (waiters keep waiting);
        # why a model is not served (NOT_FOUND...), if it is not; how long a slot took.
        self.expecting: Callable[[str], bool] = lambda model: False
        self.explain: Callable[[str], StatusError | None] = lambda model: None
        self.on_waited: Callable[[str, float], None] = lambda model, seconds: None
        self.stopping = False
        self._waiters: dict[str, deque[_Waiter]] = {}
        self.queued = 0

    def limit(self, queued: Quota, max_wait: float) -> None:
        """The limits on waits, set once by the service that takes the requests: each
        client's waiting requests are counted against `queued`, and none waits over
        `max_wait` seconds (--max-wait)."""
        self.queued_quota, self.max_wait = queued, max_wait

    def queue_depth(self, model: str) -> int:
        return len(self._waiters.get(model, ()))

    async def take(self, client: str, ask: Ask, time_remaining: float | None) -> Slot:
        """A slot for one of `client`'s requests, waiting until its deadline (`time_remaining`
        seconds; None: none) but at most --max-wait. Raises StatusError, the request's final
        status: UNAVAILABLE once the queen stops; RESOURCE_EXHAUSTED beyond the client's
        waits or the queue's bound; DEADLINE_EXCEEDED; NOT_FOUND or UNAVAILABLE if the model
        is gone."""
        if self.stopping:
            raise _stopped()
        slot = self.try_take(ask)
        if slot is not None:
            self.on_waited(ask.model, 0.0)
            return slot
        loop = asyncio.get_running_loop()
        began = loop.time()
        refused = self.queued_quota.acquire(client)
        if refused is not None:
            raise StatusError(grpc.StatusCode[refused.code], refused.message)
        timeout, capped = slot_wait(time_remaining, self.max_wait)
        try:
            slot = await self._wait(ask, timeout)
        except TimeoutError:
            raise self._timed_out(ask.model, capped) from None
        except ModelGone as gone:
            raise self._gone(ask.model, gone) from None
        finally:
            self.queued_quota.release(client)
        self.on_waited(ask.model, loop.time() - began)
        return slot

    def _timed_out(self, model: str, capped: bool) -> StatusError:
        others = self.queue_depth(model)
        if capped:
            message = waited_too_long(model, self.max_wait, others)
        else:
            message = (
                f"no free worker of model {model!r} before the deadline; {others} other "
                "request(s) waiting"
            )
        return StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, message)

    def _gone(self, model: str, gone: ModelGone) -> StatusError:
        if self.stopping:
            return _stopped()
        # Unknown after all (e.g. once a restarted queen has heard every hive): say so.
        return self.explain(model) or StatusError(grpc.StatusCode.UNAVAILABLE, str(gone))

    def try_take(self, ask: Ask) -> Slot | None:
        """A slot at once, or None, without queueing (and without overtaking waiters that
        would take any free worker)."""
        queue = self._waiters.get(ask.model)
        if queue and any(not w.affinity_until for w in queue):
            return None
        return self.router.take(ask)

    async def _wait(self, ask: Ask, timeout: float | None) -> Slot:
        """A slot on a free worker, waiting up to `timeout` seconds in the model's queue.
        Raises TimeoutError, ModelGone, or StatusError if the queue is full."""
        slot = self.try_take(ask)
        if slot is not None:
            return slot
        if self.queued >= self.max_queue:
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queen queue is full: {self.queued} requests are already queued (limit "
                f"{self.max_queue}); retry later",
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), ask)
        wakeup = None
        if ask.want is not None and self.router.has_free(ask.model):
            # Free workers were declined for a busy holder of the prefix: not for long.
            waiter.affinity_until = loop.time() + self.cache_wait
            wakeup = loop.call_later(self.cache_wait, self.dispatch, ask.model)
        queue = self._waiters.setdefault(ask.model, deque())
        queue.append(waiter)
        self.queued += 1
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the result, leaving the caller holding a slot it will not use.
            async with asyncio.timeout(timeout):
                return await waiter.future
        except BaseException:
            future = waiter.future
            if future.done() and not future.cancelled() and not future.exception():
                # A slot was handed to us just as we gave up: pass it on, never leak it.
                self.give_back(future.result(), Outcome(ok=None))
            future.cancel()
            raise
        finally:
            if wakeup is not None:
                wakeup.cancel()
            self.queued -= 1
            if waiter in queue:
                queue.remove(waiter)
            if not queue and self._waiters.get(ask.model) is queue:
                del self._waiters[ask.model]

    def give_back(self, slot: Slot, outcome: Outcome) -> None:
        """Return a slot, count how it went, and wake a waiter it suits."""
        self.router.give_back(slot, outcome)
        self.dispatch(slot.model)

    def dispatch(self, model: str) -> None:
        """Hand free slots of `model` to its waiters, oldest first."""
        queue = self._waiters.get(model)
        if not queue:
            return
        if not self.router.registry.has_model(model) and not self.expecting(model):
            self.fail(model, f"every worker of model {model!r} left while the request waited")
            return
        now = asyncio.get_running_loop().time()
        for waiter in list(queue):
            if not self.router.has_free(model):
                return
            if waiter.future.done():
                queue.remove(waiter)
                continue
            slot = self.router.take(waiter.ask, affinity=now < waiter.affinity_until)
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

    def stop(self) -> None:
        """The queen is shutting down: every wait ends (UNAVAILABLE, saying so) and none
        begins."""
        self.stopping = True
        for model in list(self._waiters):
            self.fail(model, stopping.ended_while_waiting())


def _stopped() -> StatusError:
    return stopping.status(stopping.ended_while_waiting())


def slot_wait(time_remaining: float | None, max_wait: float) -> tuple[float, bool]:
    """How long a request may wait for a slot: until its deadline, never longer than the
    queen's --max-wait; and whether --max-wait is what limits it."""
    if time_remaining is None or time_remaining > max_wait:
        return max_wait, True
    return max(time_remaining, 0.0), False


def waited_too_long(model: str, max_wait: float, others: int) -> str:
    """DEADLINE_EXCEEDED's message when --max-wait, not the client's deadline, ended a wait."""
    return (
        f"no free worker of model {model!r} within the queen's --max-wait of {max_wait:g} s; "
        f"{others} other request(s) waiting; retry later"
    )
