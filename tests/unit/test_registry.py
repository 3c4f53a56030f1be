"""The queen's registry: heartbeats, health by the queen's own clock, slots, drains, breakers."""

from __future__ import annotations

from protos.v1 import common_pb2, queen_pb2
from queen.routing.ask import Outcome, Slot
from tests.fakes import FakeClock
from tests.queen_fakes import Fleet, split_settings

OK = Outcome(ok=True, duration=1.0, tokens=10)
FAULT = Outcome(ok=False, worker_fault=True)


def record(
    worker_id: str,
    hive: str = "h1",
    model: str = "m",
    state: int = common_pb2.WORKER_STATE_IDLE,
    slots: int = 1,
    tags: tuple[str, ...] = (),
) -> common_pb2.WorkerRecord:
    return common_pb2.WorkerRecord(
        id=worker_id,
        hive_id=hive,
        model=model,
        state=state,  # type: ignore[arg-type]
        slots_total=slots,
        address=f"{hive}:w{worker_id}",
        tags=tags,
    )


def beat(
    hive: str, *workers: common_pb2.WorkerRecord, leaving: bool = False
) -> queen_pb2.HiveHeartbeat:
    return queen_pb2.HiveHeartbeat(
        hive_id=hive, address=f"{hive}:1", workers=workers, leaving=leaving
    )


def make(**settings: object) -> tuple[Fleet, FakeClock, list[queen_pb2.Event]]:
    clock = FakeClock()
    events: list[queen_pb2.Event] = []
    return Fleet(clock, *split_settings(**settings), events=events), clock, events


def pick(reg: Fleet, model: str = "m", **kw: object) -> str | None:
    slot = reg.take(model, **kw)  # type: ignore[arg-type]
    return slot.worker_id if slot else None


def kinds(events: list[queen_pb2.Event]) -> list[str]:
    return [queen_pb2.EventKind.Name(e.kind).removeprefix("EVENT_KIND_") for e in events]


def test_heartbeat_registers_unknown_hive_and_indexes_by_model() -> None:
    reg, _, events = make()
    reg.apply_heartbeat(beat("h1", record("a"), record("b", model="other")))
    assert kinds(events) == ["HIVE_JOINED", "WORKER_JOINED", "WORKER_JOINED"]
    assert reg.models() == ["m", "other"]
    assert [w.id for w in reg.workers_of_model("m")] == ["a"]
    assert {w.id for w in reg.workers_of_hive("h1")} == {"a", "b"}


def test_heartbeat_replaces_the_hives_rows() -> None:
    reg, _, events = make()
    reg.apply_heartbeat(beat("h1", record("a"), record("b")))
    removed = reg.apply_heartbeat(beat("h1", record("b"), record("c")))
    assert set(reg.workers) == {"b", "c"}
    assert removed.removed == ["h1:wa"]
    reg.apply_heartbeat(beat("h1", record("b", state=common_pb2.WORKER_STATE_FAILED)))
    assert kinds(events)[-2:] == ["WORKER_REMOVED", "WORKER_STATE_CHANGED"]
    assert events[-1].previous_state == common_pb2.WORKER_STATE_IDLE
    reg.apply_heartbeat(beat("h1"))
    assert reg.workers == {} and reg.models() == []


def test_leaving_hive_is_forgotten_at_once() -> None:
    reg, _, events = make()
    reg.apply_heartbeat(beat("h1", record("a")))
    reg.apply_heartbeat(beat("h2", record("b", hive="h2")))
    reg.apply_heartbeat(beat("h1", leaving=True))
    assert set(reg.hives) == {"h2"} and set(reg.workers) == {"b"}
    assert events[-1].kind == queen_pb2.EVENT_KIND_HIVE_REMOVED


def test_slot_accounting_is_the_queens_own() -> None:
    reg, _, _ = make(default_policy=common_pb2.ROUTING_POLICY_LRU)
    reg.apply_heartbeat(beat("h1", record("a"), record("b"), record("c")))
    slots = [reg.take("m") for _ in range(3)]
    assert [slot.worker_id for slot in slots if slot] == ["a", "b", "c"]
    assert reg.take("m") is None
    reg.apply_heartbeat(beat("h1", record("a"), record("b"), record("c")))
    assert reg.take("m") is None  # a heartbeat never overwrites the queen's slots
    assert slots[1] and slots[0]
    reg.give_back(slots[1], OK)
    reg.give_back(slots[0], Outcome(ok=False))
    # b was given back first, so it is the least recently used.
    assert [pick(reg), pick(reg)] == ["b", "a"]
    assert (reg.workers["b"].stats.completed, reg.workers["a"].stats.failed) == (1, 1)


def test_least_loaded_prefers_most_free_slots_then_lru() -> None:
    reg, _, _ = make()
    reg.apply_heartbeat(beat("h1", record("big", slots=3), record("small")))
    assert [pick(reg) for _ in range(4)] == ["big", "big", "small", "big"]
    assert pick(reg) is None
    view = reg.view(reg.workers["big"])
    assert (view.state, view.slots_available) == (common_pb2.WORKER_STATE_BUSY, 0)


def test_only_ready_workers_are_routable() -> None:
    reg, _, _ = make()
    reg.apply_heartbeat(
        beat(
            "h1",
            record("l", state=common_pb2.WORKER_STATE_LOADING),
            record("f", state=common_pb2.WORKER_STATE_FAILED),
            record("s", state=common_pb2.WORKER_STATE_STOPPING),
        )
    )
    assert reg.has_model("m") and pick(reg) is None
    reg.apply_heartbeat(beat("h1", record("l"), record("f", state=common_pb2.WORKER_STATE_FAILED)))
    assert pick(reg) == "l"


def test_hive_health_states_by_the_queens_clock() -> None:
    reg, clock, events = make(interval=1.0)
    reg.apply_heartbeat(beat("h1", record("a")))
    reg.apply_heartbeat(beat("h2", record("b", hive="h2")))
    h1 = reg.hives["h1"]
    clock.advance(1.9)
    assert reg.hive_health(h1)[0] == common_pb2.HIVE_HEALTH_HEALTHY
    clock.advance(0.1)
    reg.apply_heartbeat(beat("h2", record("b", hive="h2")))
    health, reason = reg.hive_health(h1)
    assert health == common_pb2.HIVE_HEALTH_DEGRADED and "routed to last" in reason
    # Degraded: still routable, but after every healthy hive.
    assert [pick(reg), pick(reg)] == ["b", "a"]
    for name in ("a", "b"):
        slot = Slot(
            name, "h1" if name == "a" else "h2", f"{'h1' if name == 'a' else 'h2'}:w{name}", "m"
        )
        reg.give_back(slot, OK)
    clock.advance(1.0)
    reg.apply_heartbeat(beat("h2", record("b", hive="h2")))
    health, reason = reg.hive_health(h1)
    assert health == common_pb2.HIVE_HEALTH_UNHEALTHY and "no heartbeat for 3.0s" in reason
    assert [pick(reg), pick(reg)] == ["b", None]
    reg.sweep()
    assert [
        e.health
        for e in events
        if e.kind == queen_pb2.EVENT_KIND_HIVE_HEALTH_CHANGED and e.hive_id == "h1"
    ] == [
        common_pb2.HIVE_HEALTH_DEGRADED,
        common_pb2.HIVE_HEALTH_UNHEALTHY,
    ]
    # Back at its next heartbeat.
    reg.apply_heartbeat(beat("h1", record("a")))
    assert reg.hive_health(h1)[0] == common_pb2.HIVE_HEALTH_HEALTHY and pick(reg) == "a"
    assert events[-1].health == common_pb2.HIVE_HEALTH_HEALTHY


def test_silent_hive_is_removed_after_the_ttl() -> None:
    reg, clock, events = make(interval=1.0, hive_ttl_intervals=10)
    reg.apply_heartbeat(beat("h1", record("a")))
    clock.advance(9.9)
    assert reg.sweep() == [] and "h1" in reg.hives
    clock.advance(0.1)
    assert reg.sweep() == ["h1:wa"]
    assert reg.hives == {} and reg.workers == {} and not reg.has_model("m")
    assert events[-1].kind == queen_pb2.EVENT_KIND_HIVE_REMOVED and "TTL" in events[-1].detail


def test_circuit_breaker_opens_after_failures_in_a_row_and_half_opens() -> None:
    reg, clock, events = make(breaker_failures=3, breaker_cooldown=5.0, interval=100.0)
    reg.apply_heartbeat(beat("h1", record("a"), record("b")))
    for _ in range(3):
        slot = reg.take("m", exclude={"h1:wb"})
        assert slot and slot.worker_id == "a"
        reg.give_back(slot, FAULT)
    assert events[-1].kind == queen_pb2.EVENT_KIND_WORKER_CIRCUIT_OPENED
    assert reg.view(reg.workers["a"]).circuit_open_seconds == 5.0
    assert [pick(reg), pick(reg)] == ["b", None]
    clock.advance(5.0)
    reg.sweep()
    assert events[-1].kind == queen_pb2.EVENT_KIND_WORKER_CIRCUIT_CLOSED
    slot = reg.take("m")
    assert slot and slot.worker_id == "a"
    reg.give_back(slot, FAULT)  # half-open: one more failure and it is out again
    assert reg.workers["a"].breaker_until > 0


def test_failures_that_are_not_the_workers_fault_do_not_trip_the_breaker() -> None:
    reg, _, _ = make(breaker_failures=2)
    reg.apply_heartbeat(beat("h1", record("a")))
    for _ in range(5):
        slot = reg.take("m")
        assert slot
        reg.give_back(slot, Outcome(ok=False))  # e.g. the client's deadline
    assert reg.workers["a"].breaker_until == 0 and reg.workers["a"].stats.failed == 5


def test_drains_are_the_hives_word_and_stop_new_routing() -> None:
    reg, _, events = make()
    reg.apply_heartbeat(beat("h1", record("a"), record("b")))
    reg.drain_worker("a", True)  # an admin call: at once, before the hive's next beat
    assert reg.view(reg.workers["a"]).drained
    kept = beat("h1", record("a"), record("b"))
    kept.drained_workers.append("a")
    reg.apply_heartbeat(kept)  # the hive keeps it: still drained
    assert [pick(reg), pick(reg)] == ["b", None]
    fresh, _, _ = make()
    fresh.apply_heartbeat(kept)  # a restarted queen learns it from the first beat
    assert fresh.workers["a"].drained and not fresh.workers["b"].drained
    reg.apply_heartbeat(beat("h1", record("a"), record("b")))  # undrained through another queen
    assert not reg.workers["a"].drained
    whole = beat("h2", record("c", hive="h2"))
    whole.drained = True
    reg.apply_heartbeat(whole)
    assert reg.hives["h2"].drained and reg.is_drained(reg.workers["c"])
    assert "WORKER_DRAINED" in kinds(events) and "WORKER_UNDRAINED" in kinds(events)
    assert "HIVE_DRAINED" in kinds(events)


def test_required_tags_select_a_subset() -> None:
    reg, _, _ = make()
    reg.apply_heartbeat(
        beat(
            "h1",
            record("plain", slots=4),
            record("gpu", tags=("gpu", "eu")),
            record("gpu2", tags=("gpu",)),
        )
    )
    assert pick(reg, tags=["gpu", "eu"]) == "gpu"
    assert pick(reg, tags=["gpu", "eu"]) is None
    assert pick(reg, tags=["gpu"]) == "gpu2"
    assert pick(reg, tags=["tpu"]) is None
    assert pick(reg) == "plain"


def test_a_worker_that_loses_a_tag_leaves_that_tags_pool() -> None:
    reg, _, _ = make()
    reg.apply_heartbeat(beat("h1", record("w", slots=4, tags=("gpu",))))
    slot = reg.take("m", tags=["gpu"])
    assert slot is not None and slot.worker_id == "w"
    reg.give_back(slot, Outcome(ok=True))
    reg.apply_heartbeat(beat("h1", record("w", slots=4)))  # the hive dropped the tag
    assert pick(reg, tags=["gpu"]) is None
    assert pick(reg) == "w"


def test_a_record_without_its_hive_id_is_the_beating_hives() -> None:
    reg, _, events = make()
    reg.apply_heartbeat(beat("h1", record("w", slots=2)))
    joined = len(events)
    reg.apply_heartbeat(beat("h1", record("w", hive="", slots=2)))
    reg.apply_heartbeat(beat("h1", record("w", hive="", slots=2)))
    assert len(events) == joined  # the same worker: not dropped and re-added every beat
    assert reg.workers["w"].record.hive_id == "h1"
    assert pick(reg) == "w"


def test_unreachable_worker_is_skipped_until_its_hive_reports_it_again() -> None:
    reg, _, _ = make()
    reg.apply_heartbeat(beat("h1", record("a"), record("b")))
    reg.mark_unreachable("a")
    assert [pick(reg), pick(reg)] == ["b", None]
    assert "could not reach" in reg.view(reg.workers["a"]).failure_reason
    reg.apply_heartbeat(beat("h1", record("a"), record("b")))
    assert pick(reg) == "a"


def test_exclude_skips_addresses_already_tried() -> None:
    reg, _, _ = make()
    reg.apply_heartbeat(beat("h1", record("a"), record("b")))
    assert pick(reg, exclude={"h1:wa"}) == "b"
    assert pick(reg, exclude={"h1:wa"}) is None
    assert pick(reg) == "a"


def test_restarted_worker_starts_with_free_slots() -> None:
    reg, _, _ = make()
    reg.apply_heartbeat(beat("h1", record("a")))
    slot = reg.take("m")
    assert slot is not None
    failed = record("a", state=common_pb2.WORKER_STATE_FAILED)
    failed.address = ""
    reg.apply_heartbeat(beat("h1", failed))
    reg.give_back(slot, FAULT)  # the relay notices later: must not touch the new incarnation
    restarted = record("a")
    restarted.address = "h1:9"
    reg.apply_heartbeat(beat("h1", restarted))
    assert reg.workers["a"].in_flight == 0
    slot = reg.take("m")
    assert slot and slot.address == "h1:9"


def test_spawn_reply_and_retire_update_the_registry_ahead_of_heartbeats() -> None:
    reg, _, _ = make()
    reg.apply_heartbeat(beat("h1", record("a")))
    reg.apply_worker(record("b"))
    assert {w.id for w in reg.workers_of_hive("h1")} == {"a", "b"}
    assert pick(reg, exclude={"h1:wa"}) == "b"
    reg.apply_worker(record("x", hive="unknown-hive"))  # no hive yet: wait for its heartbeat
    assert "x" not in reg.workers
    assert reg.forget_worker("a") == "h1:wa"
    reg.apply_heartbeat(beat("h1", record("b")))
    assert set(reg.workers) == {"b"}


def test_stats_and_score_in_the_view() -> None:
    reg, _, _ = make()
    reg.apply_heartbeat(beat("h1", record("a", slots=2)))
    for duration in (1.0, 2.0, 3.0):
        slot = reg.take("m")
        assert slot
        reg.give_back(slot, Outcome(ok=True, duration=duration, tokens=20))
    slot = reg.take("m")
    assert slot
    reg.give_back(slot, FAULT)
    stats = reg.view(reg.workers["a"]).stats
    assert stats.mean_duration_seconds == 2.0 and stats.p50_duration_seconds == 2.0
    assert stats.success_rate == 0.75 and stats.consecutive_failures == 1
    assert 6.6 < stats.tokens_per_second < 20
    # free ratio 1 x 0.5 + success 0.75 x 0.3 + (only worker: fastest) 1 x 0.2
    assert abs(stats.score - (0.5 + 0.225 + 0.2)) < 1e-9


def test_tag_pools_per_model_stay_bounded() -> None:
    from queen.routing.router import MAX_POOLS_PER_MODEL

    reg, _, _ = make()
    tags = tuple(f"t{i}" for i in range(10))
    reg.apply_heartbeat(beat("h1", record("a", slots=100, tags=tags)))
    for i in range(MAX_POOLS_PER_MODEL * 2):
        wanted = [tags[j] for j in range(10) if i >> j & 1]
        assert pick(reg, tags=wanted) == "a"
    assert len(reg.router._pools["m"]) <= MAX_POOLS_PER_MODEL
    assert frozenset() in reg.router._pools["m"]
    assert reg.router.pool_size("m", frozenset({"t1", "t9"})) == 1


def test_a_new_registry_warms_up_for_two_intervals_and_a_reconnect_backoff() -> None:
    """A hive whose channel backed off while the queen was down reconnects within 1 s."""
    reg, clock, _ = make(interval=0.2)
    assert reg.warming_up()
    clock.advance(1.39)
    assert reg.warming_up()
    clock.advance(0.02)
    assert not reg.warming_up()
