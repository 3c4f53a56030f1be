"""The queen's registry: heartbeats, health by the queen's own clock, leases and LRU order."""

from __future__ import annotations

from protos.v1 import common_pb2, queen_pb2
from queen.registry import Registry
from tests.fakes import FakeClock

S = common_pb2


def record(
    worker_id: str,
    hive: str = "h1",
    model: str = "m",
    state: int = S.WORKER_STATE_IDLE,
    slots: int = 1,
) -> common_pb2.WorkerRecord:
    return common_pb2.WorkerRecord(
        id=worker_id,
        hive_id=hive,
        model=model,
        state=state,  # type: ignore[arg-type]
        slots_total=slots,
        address=f"127.0.0.1:{abs(hash(worker_id)) % 50000 + 1000}",
    )


def beat(
    hive: str, *workers: common_pb2.WorkerRecord, leaving: bool = False
) -> queen_pb2.HiveHeartbeat:
    return queen_pb2.HiveHeartbeat(
        hive_id=hive, address=f"{hive}:1", workers=workers, leaving=leaving
    )


def make(interval: float = 1.0) -> tuple[Registry, FakeClock]:
    clock = FakeClock()
    return Registry(clock, interval), clock


def test_heartbeat_registers_unknown_hive_and_indexes_by_model() -> None:
    reg, _ = make()
    outcome = reg.apply_heartbeat(beat("h1", record("a"), record("b", model="other")))
    assert outcome.new_hive
    assert reg.models() == ["m", "other"]
    assert [w.id for w in reg.workers_of_model("m")] == ["a"]
    assert {w.id for w in reg.workers_of_hive("h1")} == {"a", "b"}
    assert not reg.apply_heartbeat(beat("h1", record("a"))).new_hive


def test_heartbeat_replaces_the_hives_rows() -> None:
    reg, _ = make()
    reg.apply_heartbeat(beat("h1", record("a"), record("b")))
    outcome = reg.apply_heartbeat(beat("h1", record("b"), record("c")))
    assert set(reg.workers) == {"b", "c"}
    assert outcome.removed_addresses == [record("a").address]
    reg.apply_heartbeat(beat("h1"))
    assert reg.workers == {} and reg.models() == []


def test_leaving_hive_is_forgotten_at_once() -> None:
    reg, _ = make()
    reg.apply_heartbeat(beat("h1", record("a")))
    reg.apply_heartbeat(beat("h2", record("b", hive="h2")))
    reg.apply_heartbeat(beat("h1", leaving=True))
    assert set(reg.hives) == {"h2"} and set(reg.workers) == {"b"}


def test_lru_pick_and_slot_accounting() -> None:
    reg, _ = make()
    reg.apply_heartbeat(beat("h1", record("a"), record("b"), record("c")))
    picks = [reg.acquire("m") for _ in range(3)]
    assert [p.worker_id for p in picks if p] == ["a", "b", "c"]
    assert reg.acquire("m") is None  # every slot leased, whatever the heartbeat says
    reg.apply_heartbeat(beat("h1", record("a"), record("b"), record("c")))
    assert reg.acquire("m") is None  # a heartbeat never overwrites the queen's leases
    assert picks[1] is not None and picks[0] is not None
    reg.release(picks[1], ok=True)
    reg.release(picks[0], ok=False)
    # b was freed first, so it is the least recently used.
    assert [reg.acquire("m").worker_id for _ in range(2)] == ["b", "a"]  # type: ignore[union-attr]
    assert (reg.workers["b"].completed, reg.workers["a"].failed) == (1, 1)


def test_multi_slot_worker_takes_several_leases() -> None:
    reg, _ = make()
    reg.apply_heartbeat(beat("h1", record("big", slots=3), record("small")))
    ids = [reg.acquire("m").worker_id for _ in range(4)]  # type: ignore[union-attr]
    assert sorted(ids) == ["big", "big", "big", "small"]
    assert reg.acquire("m") is None
    view = reg.workers["big"].view()
    assert (view.state, view.slots_available) == (S.WORKER_STATE_BUSY, 0)


def test_only_ready_workers_are_routable() -> None:
    reg, _ = make()
    reg.apply_heartbeat(
        beat(
            "h1",
            record("l", state=S.WORKER_STATE_LOADING),
            record("f", state=S.WORKER_STATE_FAILED),
            record("s", state=S.WORKER_STATE_STOPPING),
        )
    )
    assert reg.has_model("m")
    assert reg.acquire("m") is None
    reg.apply_heartbeat(beat("h1", record("l"), record("f", state=S.WORKER_STATE_FAILED)))
    assert reg.acquire("m").worker_id == "l"  # type: ignore[union-attr]


def test_silent_hive_is_unhealthy_after_three_intervals_by_queen_clock() -> None:
    reg, clock = make(interval=1.0)
    reg.apply_heartbeat(beat("h1", record("a")))
    reg.apply_heartbeat(beat("h2", record("b", hive="h2")))
    clock.advance(2.9)
    reg.apply_heartbeat(beat("h2", record("b", hive="h2")))
    assert reg.hive_healthy("h1")
    clock.advance(0.1)
    health, reason = reg.hive_health(reg.hives["h1"])
    assert health == queen_pb2.HIVE_HEALTH_UNHEALTHY
    assert "no heartbeat for 3.0s" in reason
    assert reg.hive_healthy("h2")
    assert [reg.acquire("m").worker_id, reg.acquire("m")] == ["b", None]  # type: ignore[union-attr]
    # Back at its next heartbeat.
    reg.apply_heartbeat(beat("h1", record("a")))
    assert reg.acquire("m").worker_id == "a"  # type: ignore[union-attr]


def test_unreachable_worker_is_skipped_until_its_hive_reports_it_again() -> None:
    reg, _ = make()
    reg.apply_heartbeat(beat("h1", record("a"), record("b")))
    reg.mark_unreachable("a")
    assert reg.acquire("m").worker_id == "b"  # type: ignore[union-attr]
    assert reg.acquire("m") is None
    assert "could not reach" in reg.workers["a"].view().failure_reason
    reg.apply_heartbeat(beat("h1", record("a"), record("b")))
    assert reg.acquire("m").worker_id == "a"  # type: ignore[union-attr]


def test_exclude_skips_workers_already_tried() -> None:
    reg, _ = make()
    reg.apply_heartbeat(beat("h1", record("a"), record("b")))
    a = record("a").address
    assert reg.acquire("m", exclude={a}).worker_id == "b"  # type: ignore[union-attr]
    assert reg.acquire("m", exclude={a}) is None
    assert reg.acquire("m").worker_id == "a"  # type: ignore[union-attr]


def test_release_after_worker_vanished_is_harmless() -> None:
    reg, _ = make()
    reg.apply_heartbeat(beat("h1", record("a")))
    lease = reg.acquire("m")
    assert lease is not None
    reg.apply_heartbeat(beat("h1"))
    reg.release(lease, ok=True)
    assert reg.workers == {}
    # Same id back (e.g. re-adopted) with a fresh entry: the old lease does not free a slot twice.
    reg.apply_heartbeat(beat("h1", record("a")))
    reg.release(lease, ok=True)
    assert reg.workers["a"].in_flight == 0


def test_spawn_reply_and_retire_update_the_registry_ahead_of_heartbeats() -> None:
    reg, _ = make()
    reg.apply_heartbeat(beat("h1", record("a")))
    reg.apply_worker(record("b"))
    assert {w.id for w in reg.workers_of_hive("h1")} == {"a", "b"}
    assert reg.acquire("m", exclude={record("a").address}).worker_id == "b"  # type: ignore[union-attr]
    reg.apply_worker(record("x", hive="unknown-hive"))  # no hive yet: wait for its heartbeat
    assert "x" not in reg.workers
    assert reg.forget_worker("a") == record("a").address
    assert {w.id for w in reg.workers_of_hive("h1")} == {"b"}
    reg.apply_heartbeat(beat("h1", record("b")))
    assert set(reg.workers) == {"b"}


def test_restarted_worker_starts_with_free_slots() -> None:
    reg, _ = make()
    reg.apply_heartbeat(beat("h1", record("a")))
    lease = reg.acquire("m")
    assert lease is not None
    failed = record("a", state=S.WORKER_STATE_FAILED)
    failed.address = ""
    reg.apply_heartbeat(beat("h1", failed))
    reg.release(lease, ok=False)  # the relay notices later: must not touch the new incarnation
    restarted = record("a")
    restarted.address = "127.0.0.1:9"
    reg.apply_heartbeat(beat("h1", restarted))
    assert reg.workers["a"].in_flight == 0
    assert reg.acquire("m").address == "127.0.0.1:9"  # type: ignore[union-attr]
