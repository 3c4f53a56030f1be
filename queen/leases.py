"""Direct leases (FastChat's get_worker_address, done with accounting).

The queen takes a slot in its registry, asks the worker to hold it (a
HoldLease stream), and hands the client the worker's address and a lease id.
The stream tells the queen when the client's call starts and ends, or that
the lease expired unused; either way the slot comes back at once, and the
lease's `on_end` runs (the client's lease count goes down).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog

from apiary.errors import StatusError
from protos.v1 import worker_pb2
from queen.channels import Channels
from queen.registry import Outcome, Slot
from queen.scheduler import Scheduler

log = structlog.get_logger("queen.leases")

DEFAULT_TTL = 30.0
# The longest lease a client may ask for unless the queen is told otherwise (--max-lease-ttl):
# a held slot serves no one else, so an idle lease should not keep it for long.
DEFAULT_MAX_TTL = 300.0


def _nothing() -> None:
    pass


@dataclass
class Lease:
    """A slot handed to a client to call its worker directly, followed until it ends."""

    id: str
    slot: Slot
    ttl: float
    task: asyncio.Task[None] | None = None
    # Who took it: only they (or an admin) may give it back.
    owner: str = ""
    # Called once when the lease ends, however it ends.
    on_end: Callable[[], None] = field(default=_nothing)


class LeaseManager:
    def __init__(self, scheduler: Scheduler, channels: Channels) -> None:
        self.scheduler = scheduler
        self.channels = channels
        self.active: dict[str, Lease] = {}

    async def hold(
        self, slot: Slot, ttl: float, on_end: Callable[[], None] = _nothing, owner: str = ""
    ) -> Lease:
        """Ask the worker to hold the slot; on success the lease is followed until it ends,
        and then `on_end` is called (on failure, StatusError, and it is not)."""
        lease = Lease(f"l-{uuid.uuid4().hex}", slot, ttl, owner=owner, on_end=on_end)
        stream = self.channels.worker(slot.address).HoldLease(
            worker_pb2.HoldLeaseRequest(lease_id=lease.id, ttl_seconds=ttl)
        )
        try:
            first = await stream.read()
        except grpc.aio.AioRpcError as exc:
            fault = exc.code() == grpc.StatusCode.UNAVAILABLE
            self.scheduler.give_back(slot, Outcome(ok=False if fault else None, worker_fault=fault))
            raise StatusError(exc.code(), f"worker {slot.worker_id}: {exc.details()}") from None
        except BaseException:
            # The Lease call itself was cancelled while the worker answered: no lease, no slot.
            stream.cancel()
            self.scheduler.give_back(slot, Outcome(ok=None))
            raise
        if (
            not isinstance(first, worker_pb2.LeaseUpdate)
            or first.state != worker_pb2.LEASE_STATE_HELD
        ):
            stream.cancel()
            self.scheduler.give_back(slot, Outcome(ok=None))
            raise StatusError(grpc.StatusCode.UNAVAILABLE, f"worker {slot.worker_id} did not hold")
        self.active[lease.id] = lease
        lease.task = asyncio.get_running_loop().create_task(self._follow(lease, stream))
        return lease

    async def _follow(self, lease: Lease, stream: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
        loop = asyncio.get_running_loop()
        started = 0.0
        outcome = Outcome(ok=None)
        try:
            while True:
                # read(), not `async for`: the first message was read that way already.
                update = await stream.read()
                if not isinstance(update, worker_pb2.LeaseUpdate):
                    break  # end of stream
                if update.state == worker_pb2.LEASE_STATE_IN_USE:
                    started = loop.time()
                elif update.state == worker_pb2.LEASE_STATE_DONE:
                    outcome = Outcome(ok=True, duration=loop.time() - started)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                outcome = Outcome(ok=False, worker_fault=True)
                log.warning("lost a leased worker", lease_id=lease.id, code=exc.code().name)
        except Exception:
            log.exception("lease follower failed; freeing the slot")
        finally:
            stream.cancel()
            self.active.pop(lease.id, None)
            self.scheduler.give_back(lease.slot, outcome)
            lease.on_end()

    def release(self, lease_id: str, by: str | None = None) -> bool:
        """Give back a lease early: ends the worker's hold, which frees the slot. With `by`,
        only the lease's owner may (someone else is told it does not exist: a lease id names
        nothing to anyone else)."""
        lease = self.active.get(lease_id)
        if lease is None or lease.task is None or (by is not None and by != lease.owner):
            return False
        lease.task.cancel()
        return True

    async def close(self) -> None:
        tasks = [lease.task for lease in self.active.values() if lease.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
