"""Direct leases (FastChat's get_worker_address, done with accounting).

The queen takes a slot in its registry, asks the worker to hold it (a
HoldLease stream), and hands the client the worker's address and a lease id.
The stream tells the queen when the client's call starts and ends, or that
the lease expired unused; either way the slot comes back at once.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import grpc
import structlog

from apiary.errors import StatusError
from protos.v1 import worker_pb2
from queen.channels import Channels
from queen.registry import Lease, Outcome
from queen.scheduler import Scheduler

log = structlog.get_logger("queen.leases")

DEFAULT_TTL = 30.0
MAX_TTL = 3600.0


@dataclass
class DirectLease:
    id: str
    lease: Lease
    ttl: float
    task: asyncio.Task[None] | None = None


class LeaseManager:
    def __init__(self, scheduler: Scheduler, channels: Channels) -> None:
        self.scheduler = scheduler
        self.channels = channels
        self.active: dict[str, DirectLease] = {}

    async def hold(self, lease: Lease, ttl: float) -> DirectLease:
        """Ask the worker to hold the slot; on success the lease is followed until it ends."""
        direct = DirectLease(f"l-{uuid.uuid4().hex}", lease, ttl)
        stream = self.channels.worker(lease.address).HoldLease(
            worker_pb2.HoldLeaseRequest(lease_id=direct.id, ttl_seconds=ttl)
        )
        try:
            first = await stream.read()
        except grpc.aio.AioRpcError as exc:
            fault = exc.code() == grpc.StatusCode.UNAVAILABLE
            self.scheduler.release(lease, Outcome(ok=False if fault else None, worker_fault=fault))
            raise StatusError(exc.code(), f"worker {lease.worker_id}: {exc.details()}") from None
        if (
            not isinstance(first, worker_pb2.LeaseUpdate)
            or first.state != worker_pb2.LEASE_STATE_HELD
        ):
            stream.cancel()
            self.scheduler.release(lease, Outcome(ok=None))
            raise StatusError(grpc.StatusCode.UNAVAILABLE, f"worker {lease.worker_id} did not hold")
        self.active[direct.id] = direct
        direct.task = asyncio.get_running_loop().create_task(self._follow(direct, stream))
        return direct

    async def _follow(self, direct: DirectLease, stream: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
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
                log.warning("lost a leased worker", lease_id=direct.id, code=exc.code().name)
        except Exception:
            log.exception("lease follower failed; freeing the slot")
        finally:
            stream.cancel()
            self.active.pop(direct.id, None)
            self.scheduler.release(direct.lease, outcome)

    def release(self, lease_id: str) -> bool:
        """Give back a lease early: ends the worker's hold, which frees the slot."""
        direct = self.active.get(lease_id)
        if direct is None or direct.task is None:
            return False
        direct.task.cancel()
        return True

    async def close(self) -> None:
        tasks = [d.task for d in self.active.values() if d.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
