"""A worker's own slot accounting: calls, slots held for leases, spent leases, and the
refusals it answers with. Times are on the queen's clock, given by the test."""

from __future__ import annotations

from apiary.leasetoken import LeaseToken
from worker.slots import Refusal, Slots


def lease(name: str, expires_at: float = 100.0) -> LeaseToken:
    return LeaseToken(f"l-{name}", expires_at)


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
    assert slots.hold(lease("a"), stream=1, now=0.0)
    assert slots.free == 0
    refused = slots.start()
    assert refused is not None and refused.code == "RESOURCE_EXHAUSTED"
    # Every slot is held: a second hold holds nothing (its token still works if one frees).
    assert not slots.hold(lease("b"), stream=1, now=0.0)
    assert slots.start(lease("a"), now=1.0) is None  # the holder takes its own slot
    assert (slots.in_flight, slots.holds, slots.free) == (1, {}, 0)


def test_a_lease_is_good_for_one_call() -> None:
    slots = Slots("w1", 2)
    assert slots.start(lease("a"), now=1.0) is None  # not announced yet: a free slot serves
    slots.finish()
    assert slots.start(lease("a"), now=2.0) == Refusal(
        "FAILED_PRECONDITION",
        "lease 'l-a' is already used on worker w1; ask the queen for a new lease",
    )
    assert not slots.hold(lease("a"), stream=1, now=2.0)  # a late notice holds nothing
    assert slots.free == 2


def test_expired_leases_are_refused_and_forgotten() -> None:
    slots = Slots("w1", 2)
    assert slots.hold(lease("a", expires_at=10.0), stream=1, now=0.0)
    assert slots.free == 1
    expired = slots.start(lease("a", expires_at=10.0), now=10.0)
    assert expired is not None and expired.code == "FAILED_PRECONDITION"
    assert "expired" in expired.message
    assert slots.holds == {} and slots.free == 2  # its hold went with it
    slots.start(lease("b", expires_at=20.0), now=11.0)
    assert "l-b" in slots.spent
    slots.expire(20.0)
    assert slots.spent == {}  # past its expiry a replay is refused as expired anyway


def test_a_revoked_lease_frees_its_slot_and_cannot_be_used() -> None:
    slots = Slots("w1", 1)
    slots.hold(lease("a"), stream=1, now=0.0)
    slots.revoke(lease("a"), now=1.0)
    assert slots.free == 1
    refused = slots.start(lease("a"), now=2.0)
    assert refused is not None and refused.code == "FAILED_PRECONDITION"
    slots.revoke(lease("never-held"), now=2.0)  # revoked before its notice: spent all the same
    assert slots.start(lease("never-held"), now=3.0) is not None


def test_the_holds_of_a_stream_go_with_it() -> None:
    slots = Slots("w1", 3)
    slots.hold(lease("a"), stream=1, now=0.0)
    slots.hold(lease("b"), stream=2, now=0.0)
    assert slots.drop_holds(1) == 1
    assert set(slots.holds) == {"l-b"} and slots.free == 2
    assert slots.start(lease("a"), now=1.0) is None  # its token still works while a slot is free


def test_a_new_lease_is_served_while_a_released_leases_hold_awaits_its_revocation() -> None:
    """The queen released lease a and leased its slot as b; a's revocation comes in the next
    batch, b's caller may come first: b is the queen's word, so it is served."""
    slots = Slots("w1", 1)
    assert slots.hold(lease("a"), stream=1, now=0.0)
    assert slots.start(lease("b"), now=1.0) is None
    assert slots.in_flight == 1
    refused = slots.start(lease("c"), now=1.0)  # but never past the slots calls are using
    assert refused is not None and refused.code == "RESOURCE_EXHAUSTED"
    refused = slots.start()  # and a call without a lease still respects the hold
    assert refused is not None
