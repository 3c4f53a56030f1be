"""Heartbeats as untrusted input: field checks, what a hive may claim, and its beat budget."""

from __future__ import annotations

import pytest

from protos.v1 import common_pb2, queen_pb2
from queen.beats import BeatBudget, BeatLimits, beat_problem, changed_records, same_host
from queen.registry import HiveTaken, RegistrySettings
from tests.fakes import FakeClock
from tests.queen_fakes import Fleet

LIMITS = BeatLimits(max_workers=4, max_worker_slots=8)


def record(worker_id: str = "w1", **fields: object) -> common_pb2.WorkerRecord:
    base: dict[str, object] = {
        "id": worker_id,
        "hive_id": "h1",
        "model": "m",
        "backend": "echo",
        "state": common_pb2.WORKER_STATE_IDLE,
        "slots_total": 1,
        "address": f"10.0.0.2:{5000 + len(worker_id)}",
    }
    return common_pb2.WorkerRecord(**{**base, **fields})  # type: ignore[arg-type]


def beat(*records: common_pb2.WorkerRecord, **fields: object) -> queen_pb2.HiveHeartbeat:
    base: dict[str, object] = {"hive_id": "h1", "address": "10.0.0.2:7071", "instance": "i1"}
    return queen_pb2.HiveHeartbeat(**{**base, **fields}, workers=records)  # type: ignore[arg-type]


TOO_MANY_BLOCKS = common_pb2.WorkerSample(
    id="w1", prefix_cache=common_pb2.PrefixCache(blocks=range(4097))
)


def problem_of(b: queen_pb2.HiveHeartbeat) -> str | None:
    return beat_problem(b, LIMITS) or changed_records(b, lambda _: None, LIMITS)[1]


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (beat(address="nowhere"), "address 'nowhere' is not host:port"),
        (beat(address="h:99999"), "has no valid port"),
        (beat(hive_id="h\n1"), "hive_id"),
        (beat(*(record(f"w{i}") for i in range(5))), "at most 4 (--max-workers-per-hive)"),
        (beat(record(state=42)), "workers['w1'].state 42 is not a value"),
        (beat(record(restart_policy=9)), "workers['w1'].restart_policy 9"),
        (beat(record(slots_total=9)), "slots_total 9 is not within 1..8 (--max-worker-slots)"),
        (beat(record(slots_total=2, slots_available=3)), "slots_available 3 exceeds"),
        (beat(record(id="w\x00")), "worker id"),
        (beat(record(address="10.0.0.2:1\r\nX")), "is not host:port"),
        (beat(record(tags=["ok", "bad tag"])), "tags[]"),
        (beat(record(failure_reason="x" * 5000)), "failure_reason is 5000 characters long"),
        (beat(record(hive_id="h2")), "says it belongs to hive 'h2'"),
        (beat(record("w1"), record("w1")), "'w1' is listed twice"),
        (beat(record(load_progress=float("nan"))), "load_progress must be within 0..1"),
        (beat(backends=["echo", "x y"]), "backends[]"),
        (beat(samples=[TOO_MANY_BLOCKS]), "prefix_cache.blocks: at most 4096"),
    ],
)
def test_a_bad_field_is_named(bad: queen_pb2.HiveHeartbeat, named: str) -> None:
    problem = problem_of(bad)
    assert problem is not None and named in problem, problem


def test_a_good_beat_passes_and_unchanged_records_are_not_checked_again() -> None:
    good = beat(record("w1"), record("w2", slots_total=8, tags=["gpu", "region=eu"]))
    assert problem_of(good) is None
    held = {"w1": record("w1")}
    changed, problem = changed_records(good, held.get, LIMITS)
    assert problem is None and [r.id for r in changed] == ["w2"]


def test_workers_must_be_on_their_hives_host() -> None:
    assert same_host("10.0.0.2:5000", "10.0.0.2:7071")
    assert same_host("127.0.0.1:5000", "localhost:7071")  # both loopback
    assert not same_host("10.0.0.9:5000", "10.0.0.2:7071")
    assert same_host("gpu-a.lan:5000", "10.0.0.2:7071", also={"gpu-a.lan"})  # certificate name


def registry() -> tuple[Fleet, FakeClock, list[queen_pb2.Event]]:
    clock = FakeClock()
    events: list[queen_pb2.Event] = []
    return Fleet(clock, RegistrySettings(interval=1.0), events=events), clock, events


def test_a_hive_cannot_claim_another_live_hives_workers_or_addresses_elsewhere() -> None:
    reg, _, _ = registry()
    reg.apply_heartbeat(beat(record("w1")))
    thief = beat(
        record("w1", hive_id="h2", address="10.0.0.9:5000"),
        record("w9", hive_id="h2", address="10.0.0.2:6000"),  # on h1's host, not its own
        record("w3", hive_id="h2", address="10.0.0.9:5003"),
        hive_id="h2",
        address="10.0.0.9:7071",
        instance="i2",
    )
    result = reg.apply_heartbeat(thief)
    refused = dict(result.refused)
    assert "belongs to hive h1" in refused["w1"] and "off its hive's host" in refused["w9"]
    assert reg.workers["w1"].record.hive_id == "h1"
    assert reg.workers["w1"].record.address == "10.0.0.2:5002"
    assert set(reg.workers) == {"w1", "w3"}  # the rest of the beat was applied


def test_a_second_live_process_with_a_hives_id_is_refused_until_the_first_goes_quiet() -> None:
    reg, clock, _ = registry()
    reg.apply_heartbeat(beat(record("w1")))
    impostor = beat(address="10.0.0.9:7071", instance="other")
    with pytest.raises(HiveTaken, match=r"in use by another running hive process at 10\.0\.0\.2"):
        reg.apply_heartbeat(impostor)
    reg.apply_heartbeat(beat(instance="other", leaving=True))  # nor may it say goodbye for it
    assert "h1" in reg.hives
    clock.advance(3.0)  # the first one missed 3 intervals: a restarted hive takes over
    reg.apply_heartbeat(beat(record("w1"), instance="other"))
    assert reg.hives["h1"].instance == "other"


def test_a_worker_marked_unreachable_is_vouched_for_by_its_hives_next_beat() -> None:
    reg, _, _ = registry()
    steady = beat(record("w1"))
    reg.apply_heartbeat(steady)
    reg.mark_unreachable("w1")
    assert reg.take("m") is None
    changed, _ = changed_records(steady, lambda wid: reg.known_record("h1", wid), LIMITS)
    assert changed == []  # nothing in the record changed...
    reg.apply_heartbeat(steady, changed)
    assert reg.take("m") is not None  # ...but the hive still lists it


def test_the_beat_budget_lets_bursts_through_and_slows_a_flood() -> None:
    budget = BeatBudget(interval=1.0, burst=4, per_interval=2)
    assert [budget.allow("h1", 0.0) for _ in range(5)] == [True] * 4 + [False]
    assert budget.wait_hint("h1") == pytest.approx(0.5)
    assert budget.allow("h2", 0.0)  # per hive
    assert not budget.allow("h1", 0.4) and budget.allow("h1", 0.6)
    flood = sum(budget.allow("h3", t / 20) for t in range(200))  # 20 beats/s for 10 s
    assert flood <= 4 + 2 * 10 + 1


def test_a_hive_heard_again_after_going_silent_is_routed_to_with_an_unchanged_table() -> None:
    reg, clock, _ = registry()
    steady = beat(record("w1"))
    reg.apply_heartbeat(steady)
    clock.advance(3.5)  # silent: unhealthy, and a pick drops its worker from the index
    assert reg.take("m") is None
    changed, _ = changed_records(steady, lambda wid: reg.known_record("h1", wid), LIMITS)
    assert changed == []
    reg.apply_heartbeat(steady, changed)
    assert reg.take("m") is not None
