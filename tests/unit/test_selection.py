"""Routing policies over the per-pool indexes, with hand-made workers."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from protos.v1 import common_pb2
from queen.routing.selection import Pool, SampleIndex, SpeedScale, Verdict, make_index


@dataclass
class W:
    id: str
    free_slots: int = 1
    in_flight: int = 0
    slots_total: int = 1
    last_used: int = 0
    speed: float | None = None
    success_rate: float = 1.0


def take(_: str) -> Verdict:
    return Verdict.TAKE


def pool_of(*workers: W) -> Pool:
    pool = Pool("m", frozenset(), random.Random(7))
    for w in workers:
        pool.update(w, True)
    return pool


def test_least_loaded_then_lru() -> None:
    pool = pool_of(
        W("a", free_slots=1, last_used=1),
        W("b", free_slots=3, last_used=5),
        W("c", free_slots=3, last_used=2),
    )
    assert pool.pick(common_pb2.ROUTING_POLICY_LEAST_LOADED, take) == "c"


def test_lru() -> None:
    pool = pool_of(W("a", last_used=3), W("b", last_used=1), W("c", last_used=2))
    assert pool.pick(common_pb2.ROUTING_POLICY_LRU, take) == "b"


def test_shortest_queue_weighs_in_flight_by_speed() -> None:
    fast = W("fast", in_flight=2, speed=100.0, free_slots=2, slots_total=4)
    slow = W("slow", in_flight=1, speed=10.0, free_slots=3, slots_total=4)
    # 2 / 1.0 (fastest) < 1 / 0.1
    assert pool_of(fast, slow).pick(common_pb2.ROUTING_POLICY_SHORTEST_QUEUE, take) == "fast"


def test_score_combines_free_ratio_success_and_relative_speed() -> None:
    reliable = W("reliable", free_slots=1, slots_total=2, success_rate=1.0, speed=50.0)
    flaky = W("flaky", free_slots=2, slots_total=2, success_rate=0.2, speed=100.0)
    # reliable: 0.25 + 0.3 + 0.1 = 0.65; flaky: 0.5 + 0.06 + 0.2 = 0.76
    assert pool_of(reliable, flaky).pick(common_pb2.ROUTING_POLICY_SCORE, take) == "flaky"
    flaky.success_rate = 0.0
    pool = pool_of(reliable, flaky)
    # flaky: 0.5 + 0 + 0.2 = 0.7 > 0.65 still; make it slow as well
    flaky.speed = 10.0
    pool.update(flaky, True)
    pool.update(reliable, True)
    assert pool.pick(common_pb2.ROUTING_POLICY_SCORE, take) == "reliable"


def test_lottery_is_weighted_by_relative_speed() -> None:
    scale = SpeedScale()
    index = SampleIndex(scale, random.Random(3))
    for w in [W("fast", speed=90.0), W("slow", speed=10.0)]:
        scale.note(w.id, w.speed)
        index.update(w, True)
    counts = Counter(index.pick(take) for _ in range(5000))
    assert 0.86 < counts["fast"] / 5000 < 0.94


@pytest.mark.parametrize(
    "policy",
    [
        common_pb2.ROUTING_POLICY_LRU,
        common_pb2.ROUTING_POLICY_LEAST_LOADED,
        common_pb2.ROUTING_POLICY_SCORE,
        common_pb2.ROUTING_POLICY_SHORTEST_QUEUE,
    ],
)
def test_verdicts_skip_defer_and_drop(policy: int) -> None:
    index = make_index(policy, SpeedScale(), random.Random(1))
    for i, name in enumerate(["dead", "tried", "degraded", "fine"]):
        index.update(W(name, last_used=i), True)
    verdicts = {
        "dead": Verdict.DROP,
        "tried": Verdict.SKIP,
        "degraded": Verdict.LATER,
        "fine": Verdict.TAKE,
    }
    assert index.pick(lambda w: verdicts[w]) == "fine"
    assert len(index) == 3  # dead is out until re-added
    verdicts["fine"] = Verdict.SKIP
    assert index.pick(lambda w: verdicts[w]) == "degraded"  # nothing healthy: the degraded one
    verdicts["degraded"] = Verdict.SKIP
    assert index.pick(lambda w: verdicts[w]) is None


def test_lru_order_follows_use_and_re_entry() -> None:
    index = make_index(common_pb2.ROUTING_POLICY_LRU, SpeedScale(), random.Random(1))
    a, b, c = W("a", last_used=1), W("b", last_used=2), W("c", last_used=3)
    for w in (a, b, c):
        index.update(w, True)
    assert index.pick(take) == "a"
    a.last_used = 4
    index.update(a, True)
    assert index.pick(take) == "b"
    index.update(b, False)  # busy
    index.update(c, True)  # a heartbeat: not a use, keeps its place
    assert index.pick(take) == "c"
    index.update(b, True)  # back, still the longest unused
    assert index.pick(take) == "b"


def test_quantised_levels_keep_lru_among_equals() -> None:
    index = make_index(common_pb2.ROUTING_POLICY_LEAST_LOADED, SpeedScale(), random.Random(1))
    workers = [W(f"w{i}", free_slots=2, slots_total=2, last_used=10 - i) for i in range(5)]
    for w in workers:
        index.update(w, True)
    assert index.pick(take) == "w4"
    workers[4].free_slots = 1
    workers[4].last_used = 11
    index.update(workers[4], True)
    assert [index.pick(take)] == ["w3"]


def test_lottery_grows_and_ignores_ineligible() -> None:
    index = SampleIndex(SpeedScale(), random.Random(1))
    for i in range(100):
        index.update(W(f"w{i}"), eligible=(i == 57))
    assert {index.pick(take) for _ in range(50)} == {"w57"}
    index.discard("w57")
    assert index.pick(take) is None
    for i in range(100):
        index.update(W(f"w{i}"), eligible=True)
    for i in range(0, 100, 2):
        index.discard(f"w{i}")
    assert {index.pick(take) for _ in range(300)} <= {f"w{i}" for i in range(1, 100, 2)}
