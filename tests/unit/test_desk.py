"""The desk: FIFO hand-off, deadlines, queue bounds, models that vanish, each ending in the
request's final status."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from apiary.errors import StatusError
from protos.v1 import common_pb2, queen_pb2
from queen.registry import Registry
from queen.routing.ask import Ask, Outcome, Slot
from queen.routing.desk import Desk
from queen.routing.router import Router
from tests.fakes import FakeClock


class OneClientDesk(Desk):
    """The desk, asked for any worker of a model by one client."""

    async def take_any(self, model: str, timeout: float | None) -> Slot:
        return await self.take("client", Ask(model), timeout)


def status_of(excinfo: pytest.ExceptionInfo[StatusError]) -> grpc.StatusCode:
    return excinfo.value.code


def setup(workers: int = 1, max_queue: int = 10) -> tuple[Registry, OneClientDesk]:
    reg = Registry(FakeClock())
    records = [
        common_pb2.WorkerRecord(
            id=f"w{i}",
            hive_id="h1",
            model="m",
            state=common_pb2.WORKER_STATE_IDLE,
            slots_total=1,
            address=f"h:{i}",
        )
        for i in range(workers)
    ]
    reg.apply_heartbeat(queen_pb2.HiveHeartbeat(hive_id="h1", address="h", workers=records))
    return reg, OneClientDesk(Router(reg, seed=1), max_queue)


async def test_free_slot_is_granted_at_once() -> None:
    _, desk = setup()
    slot = await desk.take_any("m", timeout=0)
    assert slot.worker_id == "w0"


async def test_waiters_are_served_in_arrival_order() -> None:
    _, desk = setup()
    held = await desk.take_any("m", None)
    order: list[int] = []

    async def wait(i: int) -> None:
        slot = await desk.take_any("m", 5)
        order.append(i)
        desk.give_back(slot, Outcome(ok=True))

    tasks = [asyncio.create_task(wait(i)) for i in range(5)]
    await asyncio.sleep(0)
    assert desk.queue_depth("m") == 5
    desk.give_back(held, Outcome(ok=True))
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert desk.queued == 0


async def test_new_request_does_not_overtake_waiters() -> None:
    reg, desk = setup()
    held = await desk.take_any("m", None)
    waiter = asyncio.create_task(desk.take_any("m", 5))
    await asyncio.sleep(0)
    # Giving it back hands the slot straight to the waiter, so a newcomer finds none free.
    desk.give_back(held, Outcome(ok=True))
    newcomer = asyncio.create_task(desk.take_any("m", 0.05))
    assert (await waiter).worker_id == "w0"
    with pytest.raises(StatusError) as timed_out:
        await newcomer
    assert status_of(timed_out) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "before the deadline; 0 other request(s) waiting" in timed_out.value.message
    assert reg.workers["w0"].in_flight == 1


async def test_timeout_leaves_no_waiter_and_no_leaked_slot() -> None:
    reg, desk = setup()
    held = await desk.take_any("m", None)
    with pytest.raises(StatusError, match="before the deadline"):
        await desk.take_any("m", 0.01)
    assert desk.queued == 0 and desk.queue_depth("m") == 0
    desk.give_back(held, Outcome(ok=True))
    assert reg.workers["w0"].in_flight == 0


async def test_cancel_after_handoff_passes_the_slot_on() -> None:
    reg, desk = setup()
    held = await desk.take_any("m", None)
    first = asyncio.create_task(desk.take_any("m", 5))
    second = asyncio.create_task(desk.take_any("m", 5))
    await asyncio.sleep(0)
    desk.give_back(held, Outcome(ok=True))  # hands the slot to `first`...
    first.cancel()  # ...which gives up before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await second).worker_id == "w0"
    assert reg.workers["w0"].in_flight == 1


async def test_queue_is_bounded() -> None:
    _, desk = setup(max_queue=1)
    await desk.take_any("m", None)
    waiting = asyncio.create_task(desk.take_any("m", 5))
    await asyncio.sleep(0)
    with pytest.raises(StatusError) as full:
        await desk.take_any("m", 5)
    assert status_of(full) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queen queue is full: 1 requests are already queued (limit 1)" in full.value.message
    waiting.cancel()


async def test_waiters_fail_when_every_worker_of_the_model_leaves() -> None:
    reg, desk = setup()
    await desk.take_any("m", None)
    waiting = asyncio.create_task(desk.take_any("m", 5))
    await asyncio.sleep(0)
    reg.apply_heartbeat(queen_pb2.HiveHeartbeat(hive_id="h1", address="h"))
    desk.dispatch_all()
    with pytest.raises(StatusError) as gone:
        await waiting
    assert status_of(gone) == grpc.StatusCode.UNAVAILABLE
    assert "every worker of model 'm' left while the request waited" in gone.value.message


async def test_new_worker_in_heartbeat_serves_waiters() -> None:
    reg, desk = setup()
    await desk.take_any("m", None)
    waiting = asyncio.create_task(desk.take_any("m", 5))
    await asyncio.sleep(0)
    workers = [
        common_pb2.WorkerRecord(
            id=i,
            hive_id="h1",
            model="m",
            state=common_pb2.WORKER_STATE_IDLE,
            slots_total=1,
            address=f"h:{i[-1]}",  # w0 keeps its address: the same process, its slot still taken
        )
        for i in ("w0", "w1")
    ]
    reg.apply_heartbeat(queen_pb2.HiveHeartbeat(hive_id="h1", address="h", workers=workers))
    desk.dispatch_all()
    assert (await waiting).worker_id == "w1"
