"""A worker's own slot accounting: calls, lease holds, and the refusals it answers with."""

from __future__ import annotations

from worker.slots import Refusal, Slots


def test_calls_take_slots_until_full() -> None:
    slots = Slots("w1", 2)
    assert slots.start() is None and slots.start() is None
    assert (slots.in_flight, slots.free) == (2, 0)
    assert slots.start() == Refusal(
        "RESOURCE_EXHAUSTED",
        "worker w1 has all 2 slot(s) in use; retry or send to another worker",
    )
    assert slots.in_flight == 2
    slots.finish()
    assert slots.free == 1 and slots.start() is None


def test_a_held_slot_is_not_free_for_other_calls() -> None:
    slots = Slots("w1", 1)
    assert slots.reserve("l1", 30, serving=True) is None
    assert slots.free == 0
    refused = slots.start()
    assert refused is not None and refused.code == "RESOURCE_EXHAUSTED"
    assert slots.reserve("l2", 30, serving=True) == Refusal(
        "RESOURCE_EXHAUSTED", "worker w1 has no free slot to hold"
    )


def test_the_lease_holder_uses_its_slot_once() -> None:
    slots = Slots("w1", 1)
    slots.reserve("l1", 30, serving=True)
    assert slots.start("l1") is None
    assert (slots.in_flight, slots.unused_holds(), slots.free) == (1, 0, 0)
    assert slots.start("l1") == Refusal(
        "FAILED_PRECONDITION",
        "lease 'l1' is unknown, expired or already used on worker w1; "
        "ask the queen for a new lease",
    )
    slots.finish()
    assert slots.free == 1  # used holds do not count, only the call did
    slots.drop("l1")
    assert slots.holds == {} and slots.free == 1


def test_unknown_and_expired_leases_are_refused() -> None:
    slots = Slots("w1", 2)
    unknown = slots.start("nope")
    assert unknown is not None and unknown.code == "FAILED_PRECONDITION"
    slots.reserve("l1", 30, serving=True)
    slots.expire("l1")
    expired = slots.start("l1")
    assert expired is not None and expired.code == "FAILED_PRECONDITION"
    assert slots.free == 1  # an expired hold counts until its stream drops it
    slots.drop("l1")
    assert slots.free == 2
    slots.expire("gone")  # a hold already dropped: nothing to do


def test_hold_refusals_in_order() -> None:
    slots = Slots("w1", 1)
    assert slots.reserve("", 30, serving=False) == Refusal(
        "INVALID_ARGUMENT", "lease_id is required and must be new"
    )
    assert slots.reserve("l1", 0, serving=False) == Refusal(
        "INVALID_ARGUMENT", "ttl_seconds must be > 0"
    )
    assert slots.reserve("l1", 30, serving=False) == Refusal("UNAVAILABLE", "worker is not serving")
    assert slots.reserve("l1", 30, serving=True) is None
    repeated = slots.reserve("l1", 30, serving=True)
    assert repeated is not None and repeated.message == "lease_id is required and must be new"
