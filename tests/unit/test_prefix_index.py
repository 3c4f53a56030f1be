"""Cache-aware routing, pure: prompt block hashes (apiary/prefix.py), the prefix index
(routed, reported, matched, evicted, a worker removed), demand, the pick, and the registry's
cache-aware take with a fake clock."""

from __future__ import annotations

from apiary.prefix import BLOCK_BYTES, chain, input_bytes, matched_blocks, request_chain
from protos.v1 import common_pb2, queen_pb2
from queen.routing.ask import Outcome
from queen.routing.prefix_index import (
    PROVISIONAL,
    Candidates,
    Choice,
    Demand,
    PrefixIndex,
    Want,
    choose,
)
from tests.fakes import FakeClock
from tests.queen_fakes import Fleet

CACHE_AWARE = common_pb2.ROUTING_POLICY_CACHE_AWARE


def prompt(tenant: str, question: str, blocks: int = 8) -> str:
    return tenant * (blocks * BLOCK_BYTES) + question


def test_one_hash_names_a_whole_prefix() -> None:
    a = chain("m", prompt("A", "what is honey?").encode())
    b = chain("m", prompt("A", "where is the queen? " * 20).encode())
    other = chain("m", prompt("B", "what is honey?").encode())
    assert len(a) == 8 and a == b[:8] and b[8:]  # shared system prompt, then apart
    assert not set(a) & set(other)
    assert not set(a) & set(chain("other-model", prompt("A", "").encode()))
    assert matched_blocks(b, set(a[:5])) == 5 and matched_blocks(b, set()) == 0
    # Chats: role and content of each turn, in order; a partial block is not hashed.
    chat = common_pb2.InferRequest(model="m", messages=[
        common_pb2.ChatMessage(role="system", content="x" * 600),
        common_pb2.ChatMessage(role="user", content="hi")])  # fmt: skip
    assert input_bytes(chat).startswith(b"system\x1f" + b"x" * 600 + b"\x1e")
    assert len(request_chain(chat)) == len(input_bytes(chat)) // BLOCK_BYTES == 2


def test_routed_prefixes_match_until_unconfirmed_ones_expire() -> None:
    index = PrefixIndex()
    hashes = chain("m", prompt("A", "q").encode())
    index.routed("w1", hashes, now=0.0)
    assert index.match(hashes, now=1.0) == {"w1": 8}
    assert index.match([*hashes[:3], 123], now=1.0) == {"w1": 3}
    assert index.match(hashes, now=PROVISIONAL + 1) == {}  # the worker never said it has it
    assert index.entries == 0


def test_reports_are_the_truth_and_evictions_leave_the_index() -> None:
    index = PrefixIndex()
    a, b = chain("m", prompt("A", "").encode()), chain("m", prompt("B", "").encode())
    index.reported("w1", a + b, now=0.0)
    assert index.match(a, 100.0) == {"w1": 8} and index.match(b, 100.0) == {"w1": 8}
    index.routed("w1", chain("m", prompt("C", "").encode()), now=100.0)
    index.reported("w1", a, now=100.5)  # evicted B; C not in this report yet
    assert index.match(b, 101.0) == {}
    assert index.match(chain("m", prompt("C", "").encode()), 101.0) == {"w1": 8}
    index.reported("w1", a, now=200.0)  # unchanged: nothing to do
    index.remove("w1")
    assert index.match(a, 200.0) == {} and index.entries == 0


def test_the_index_is_bounded_least_recently_touched_first_out() -> None:
    index = PrefixIndex(max_entries=16)
    old, new = chain("m", prompt("A", "").encode()), chain("m", prompt("B", "").encode())
    index.reported("w1", old, now=0.0)
    index.reported("w2", new, now=0.0)
    assert index.entries == 16
    index.match(old, 1.0)  # touched: now newer than B's
    index.routed("w3", chain("m", prompt("C", "").encode()), now=1.0)
    assert index.entries == 16
    assert index.match(old, 2.0) == {"w1": 8} and index.match(new, 2.0) == {}


def workers(free: set[str], busy: set[str], loads: dict[str, float] | None = None) -> Candidates:
    def load(worker_id: str) -> tuple[float, int]:
        return (loads or {}).get(worker_id, 0.0), 0

    def lightest() -> float:
        return min((load(w)[0] for w in free), default=1.0)

    return Candidates(free.__contains__, busy.__contains__, load, lightest)


def test_the_pick_prefers_the_longest_free_holder_then_the_least_loaded() -> None:
    free = workers({"a", "b", "c"}, set(), {"a": 0.5, "b": 0.0, "c": 0.0})
    assert choose({"a": 8, "b": 3}, 9, free, 1).take == "a"
    assert choose({"a": 8, "b": 8}, 9, free, 1).take == "b"  # a tie: the least loaded
    assert choose({"a": 1}, 9, free, 1) == choose({}, 9, free, 1)  # under 30%: a miss
    assert choose({}, 9, free, 1).take is None and not choose({}, 9, free, 1).wait_for


def test_a_busy_holder_is_waited_for_unless_its_prefix_is_hot() -> None:
    some = workers({"b"}, {"a"}, {"a": 1.0, "b": 0.0})
    waiting = choose({"a": 8}, 9, some, holders_wanted=1)
    assert waiting.take is None and waiting.wait_for == {"a"}
    spill = choose({"a": 8}, 9, some, holders_wanted=2)  # hot: one more holder wanted
    assert spill.take is None and not spill.wait_for
    assert choose({"a": 8}, 9, some, 1, session_worker="b").take == "b"
    assert choose({}, 9, some, 1, session_worker="a").wait_for == {"a"}


def test_the_load_guard_passes_over_a_holder_much_busier_than_an_idle_worker() -> None:
    # Four-slot workers: the holder has 3 of 4 in use, another worker none.
    imbalanced = workers({"a", "b"}, set(), {"a": 0.75, "b": 0.0})
    assert choose({"a": 8}, 9, imbalanced, 1) == Choice()  # least-loaded takes it
    assert choose({}, 9, imbalanced, 1, session_worker="a") == Choice()  # sessions too
    # Within the margin the prefix wins.
    close = workers({"a", "b"}, set(), {"a": 0.5, "b": 0.25})
    assert choose({"a": 8}, 9, close, 1).take == "a"
    assert choose({}, 9, close, 1, session_worker="a").take == "a"


def test_demand_asks_more_holders_for_a_hot_prefix() -> None:
    demand = Demand()
    for i in range(100):
        demand.note("m", 1 if i % 5 else 2)  # 80% one prefix
    assert demand.holders_wanted("m", 1, workers=2) == 2
    assert demand.holders_wanted("m", 2, workers=2) == 1
    assert demand.holders_wanted("m", None, workers=2) == 1
    demand.forget("m")
    assert demand.holders_wanted("m", 1, workers=2) == 1


def record(worker_id: str, backend: str = "llamacpp") -> common_pb2.WorkerRecord:
    return common_pb2.WorkerRecord(
        id=worker_id, hive_id="h1", model="m", backend=backend,
        state=common_pb2.WORKER_STATE_IDLE, slots_total=1, address=f"h1:{worker_id}",
    )  # fmt: skip


def registry(*ids: str, backend: str = "llamacpp") -> tuple[Fleet, FakeClock]:
    clock = FakeClock()
    reg = Fleet(clock)
    reg.apply_heartbeat(queen_pb2.HiveHeartbeat(
        hive_id="h1", address="h1:1", workers=[record(i, backend) for i in ids]))  # fmt: skip
    return reg, clock


def want(tenant: str, question: str = "?", session: str = "") -> Want:
    request = common_pb2.InferRequest(model="m", prompt=prompt(tenant, question))
    return Want(request, session)


def test_the_registry_routes_a_tenant_back_to_its_worker() -> None:
    reg, _ = registry("w1", "w2")
    assert (
        reg.policy_for("m", common_pb2.ROUTING_POLICY_UNSPECIFIED) == CACHE_AWARE
    )  # llamacpp workers: cache-aware by default
    first = reg.take("m", want=want("A"))
    assert first is not None and first.policy == CACHE_AWARE  # decided at the pick, once
    reg.give_back(first, outcome_ok())
    again = reg.take("m", want=want("A", "another question"))
    assert again is not None and again.worker_id == first.worker_id
    # B goes elsewhere (least-loaded among the rest), then sticks there too.
    b = reg.take("m", want=want("B"))
    assert b is not None and b.worker_id != first.worker_id


def test_a_request_waits_for_its_busy_holder_until_affinity_is_off() -> None:
    reg, _ = registry("w1", "w2")
    held = reg.take("m", want=want("A"))
    assert held is not None
    assert reg.take("m", want=want("A", "again")) is None  # w2 is free, but w1 holds A
    late = reg.take("m", want=want("A", "again"), affinity=False)
    assert late is not None and late.worker_id != held.worker_id


def test_echo_models_stay_least_loaded_and_sessions_stick() -> None:
    reg, _ = registry("w1", "w2", backend="echo")
    unspecified = common_pb2.ROUTING_POLICY_UNSPECIFIED
    assert reg.policy_for("m", unspecified) == common_pb2.ROUTING_POLICY_LEAST_LOADED
    reg2, _ = registry("w1", "w2")
    first = reg2.take("m", want=Want(None, "chat-7"))
    assert first is not None
    reg2.give_back(first, outcome_ok())
    for _ in range(3):
        slot = reg2.take("m", want=Want(None, "chat-7"))
        assert slot is not None and slot.worker_id == first.worker_id
        reg2.give_back(slot, outcome_ok())


def test_worker_reports_correct_the_index_and_removal_forgets() -> None:
    reg, clock = registry("w1", "w2")
    hashes = want("A").hashes
    sample = common_pb2.WorkerSample(id="w2", prefix_cache=common_pb2.PrefixCache(blocks=hashes))
    workers = [record("w1"), record("w2")]
    reg.apply_heartbeat(
        queen_pb2.HiveHeartbeat(hive_id="h1", address="h1:1", workers=workers, samples=[sample])
    )
    slot = reg.take("m", want=want("A"))
    assert slot is not None and slot.worker_id == "w2"  # it said it holds A
    reg.forget_worker("w2")
    assert reg.prefixes.match(hashes, clock.monotonic()) == {}


def outcome_ok() -> Outcome:
    return Outcome(ok=True, duration=0.1, tokens=1)
