"""Direct leases (FastChat's get_worker_address, done with accounting), with no call per lease.

Queen.Lease answers from the queen's own state: it takes a slot from the desk and hands the
client the worker's address and a lease token signed for that worker (apiary/leasetoken.py:
the key is derived from the worker's own credential, which its hive gave it and the queen can
derive; the worker checks a token by itself: forged, expired and reused ones are refused).
The client calls Worker.Infer with the token as lease_id.

The queen keeps one long-lived stream per worker it has leased on (Worker.Leases, a
`WorkerLink` here), opened at the first lease and never waited for:
  - queen to worker, in batches (NOTICE_BATCH, 0.1 s): its clock, the leases it handed out on the
    worker (the worker holds a slot for each, so no other caller takes it) and the leases
    given back (no call may use them any more);
  - worker to queen: a leased call started (the lease no longer expires) and ended (the slot
    comes back, with the call's outcome for the worker's statistics).
An unused lease expires on the queen's own clock, its TTL plus EXPIRY_GRACE after it was
handed out (the grace covers a call the worker accepted just before the token expired and
reported a moment later). ReleaseLease is local: the slot comes back at once and the worker
is told in the next batch. If a worker's stream fails, calls in use on it end as failed (the
worker is lost) and the queen reopens the stream while unused leases remain on that worker.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator, Callable

import grpc
import structlog

from apiary.clock import Clock, SystemClock
from apiary.leasetoken import PREFIX, lease_id_of, lease_key, mint
from protos.v1 import worker_pb2
from queen.channels import Channels
from queen.leases.book import Lease, LeaseBook
from queen.routing.ask import Outcome, Slot
from queen.routing.desk import Desk

log = structlog.get_logger("queen.leases.manager")

DEFAULT_TTL = 30.0
# The longest lease a client may ask for unless the queen is told otherwise (--max-lease-ttl):
# a held slot serves no one else, so an idle lease should not keep it for long.
DEFAULT_MAX_TTL = 300.0
# An unused lease's slot comes back this long after its token expired.
EXPIRY_GRACE = 0.5
# Notices to a worker wait this long to go together: each is a gRPC message (the costly part),
# and a lease and its release often cancel out. Holds only keep lease-less callers (none but
# the queen and hive, with tokens) off a slot; a token given back is refused within this long.
NOTICE_BATCH = 0.1
# A worker's failed lease stream is reopened after this long, while leases remain on it.
RELINK_DELAY = 0.5


def _nothing() -> None:
    pass


class LeaseManager:
    def __init__(self, desk: Desk, channels: Channels, clock: Clock | None = None) -> None:
        self.desk = desk
        self.channels = channels
        self.clock = clock or SystemClock()
        self.book = LeaseBook()
        # One lease stream per worker address.
        self.links: dict[str, WorkerLink] = {}
        self._keys: dict[tuple[str, str], bytes] = {}
        self._expiry: asyncio.Task[None] | None = None
        self._expiry_at = math.inf
        self._relinks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def active(self) -> dict[str, Lease]:
        return self.book.active

    def grant(
        self, slot: Slot, ttl: float, on_end: Callable[[], None] = _nothing, owner: str = ""
    ) -> Lease:
        """A lease on `slot` (already taken) for `ttl` seconds; `on_end` runs once it ends."""
        lease_id = PREFIX + secrets.token_urlsafe(16)
        expires_at = self.clock.time() + ttl
        token = mint(self._key(slot), lease_id, expires_at)
        deadline = self.clock.monotonic() + ttl + EXPIRY_GRACE
        lease = Lease(lease_id, token, slot, deadline, expires_at, owner, on_end)
        self.book.add(lease)
        self._arm(deadline)
        self._link(slot).hold(token)
        return lease

    def release(self, lease: str, by: str | None = None) -> bool:
        """Give back a lease (its token, or just its id) early: the slot is free at once. With
        `by`, only the lease's owner may (to anyone else it does not exist)."""
        given = self.book.give_back(lease_id_of(lease), by)
        if given is None:
            return False
        if given.started is None:
            link = self.links.get(given.slot.address)
            if link is not None:
                link.revoke(given.token)
        self._finish(given, Outcome(ok=None))
        return True

    def _finish(self, lease: Lease, outcome: Outcome) -> None:
        self.desk.give_back(lease.slot, outcome)
        lease.on_end()

    def _key(self, slot: Slot) -> bytes:
        named = (slot.hive_id, slot.worker_id)
        key = self._keys.get(named)
        if key is None:
            if len(self._keys) > 100_000:
                self._keys.clear()  # bounded; keys are cheap to derive again
            token = self.channels.tokens.worker_token(slot.hive_id, slot.worker_id)
            key = self._keys[named] = lease_key(token, slot.worker_id)
        return key

    # ---- expiry ---------------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        """One task sleeps until the earliest deadline of an unused lease (on the clock)."""
        if self._expiry is not None and not self._expiry.done() and self._expiry_at <= deadline:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = deadline
        self._expiry = asyncio.get_running_loop().create_task(self._expire_from(deadline))

    async def _expire_from(self, deadline: float) -> None:
        while True:
            await self.clock.sleep(deadline - self.clock.monotonic())
            try:
                for lease in self.book.due(self.clock.monotonic()):
                    self._finish(lease, Outcome(ok=None))  # expired unused
            except Exception:
                log.exception("lease expiry failed")  # the loop goes on
            upcoming = self.book.next_deadline()
            if upcoming is None:
                self._expiry_at = math.inf
                return
            deadline = self._expiry_at = upcoming

    # ---- the workers' lease streams -------------------------------------------

    def _link(self, slot: Slot) -> WorkerLink:
        link = self.links.get(slot.address)
        if link is None:
            unused = [
                lease.token
                for lease in self.book.of_worker(slot.worker_id)
                if lease.started is None and lease.slot.address == slot.address
            ]
            link = self.links[slot.address] = WorkerLink(self, slot, unused)
        return link

    def on_report(self, link: WorkerLink, event: worker_pb2.LeaseEvent) -> None:
        """A worker's report on its lease stream (about its own leases only)."""
        now = self.clock.monotonic()
        if event.state == worker_pb2.LEASE_STATE_IN_USE:
            self.book.start(event.lease_id, link.worker_id, now)
        elif event.state == worker_pb2.LEASE_STATE_DONE:
            lease = self.book.end(event.lease_id, link.worker_id)
            if lease is not None:
                took = now - lease.started if lease.started is not None else 0.0
                self._finish(
                    lease, Outcome(ok=event.ok, duration=took, tokens=event.completion_tokens)
                )

    def link_lost(self, link: WorkerLink, code: grpc.StatusCode | None) -> None:
        """A worker's lease stream ended: calls in use there are over as far as we can tell;
        unused leases stay (their tokens still work) and the stream is opened again."""
        if self._closed or self.links.get(link.address) is not link:
            return
        del self.links[link.address]
        fault = code == grpc.StatusCode.UNAVAILABLE
        remaining = False
        for lease in list(self.book.of_worker(link.worker_id)):
            if lease.started is None:
                remaining = True
            elif self.book.end(lease.id, link.worker_id) is not None:
                log.warning("lost a leased worker", lease_id=lease.id, code=code and code.name)
                self._finish(lease, Outcome(ok=False if fault else None, worker_fault=fault))
        if remaining:
            task = asyncio.get_running_loop().create_task(self._relink(link.slot))
            self._relinks.add(task)
            task.add_done_callback(self._relinks.discard)

    async def _relink(self, slot: Slot) -> None:
        await self.clock.sleep(RELINK_DELAY)
        if not self._closed and any(
            lease.started is None and lease.slot.address == slot.address
            for lease in self.book.of_worker(slot.worker_id)
        ):
            self._link(slot)

    async def close(self) -> None:
        self._closed = True
        tasks = [link.task for link in self.links.values()] + list(self._relinks)
        if self._expiry is not None:
            tasks.append(self._expiry)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class WorkerLink:
    """The queen's one Leases stream to a worker: notices out (batched), reports in."""

    def __init__(self, manager: LeaseManager, slot: Slot, held: list[str]) -> None:
        self.manager = manager
        self.slot = slot
        self.worker_id = slot.worker_id
        self.address = slot.address
        self.held: dict[str, None] = dict.fromkeys(held)
        self.revoked: list[str] = []
        self._pending = asyncio.Event()
        stub = manager.channels.worker(slot.address)
        # No request iterator: notices go with call.write (grpc-stubs wants one anyway).
        call = stub.Leases()  # type: ignore[call-arg]
        self.task = asyncio.get_running_loop().create_task(self._run(call))

    def hold(self, token: str) -> None:
        self.held[token] = None
        self._pending.set()

    def revoke(self, token: str) -> None:
        # Not announced yet: nothing to hold, but the worker must still refuse the token.
        self.held.pop(token, None)
        self.revoked.append(token)
        self._pending.set()

    def _notice(self) -> worker_pb2.LeaseNotice:
        notice = worker_pb2.LeaseNotice(
            queen_time=self.manager.clock.time(), held=list(self.held), revoked=self.revoked
        )
        self.held, self.revoked = {}, []
        return notice

    async def _run(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        writer = asyncio.get_running_loop().create_task(self._write(call))
        code: grpc.StatusCode | None = None
        try:
            reports: AsyncIterator[worker_pb2.LeaseReport] = call.__aiter__()
            async for report in reports:
                for event in report.events:
                    self.manager.on_report(self, event)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        except Exception:
            log.exception("lease stream failed", worker_id=self.worker_id)
        finally:
            writer.cancel()
            call.cancel()
            self.manager.link_lost(self, code)

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        try:
            # The first notice at once: the worker judges expiry on the queen's clock.
            while True:
                self._pending.clear()
                await call.write(self._notice())
                await self._pending.wait()
                await self.manager.clock.sleep(NOTICE_BATCH)
        except Exception as exc:  # the stream ended (the reader says how) or broke
            log.debug("lease notices stopped", worker_id=self.worker_id, error=repr(exc))
