"""What /health and /ready say (queen/served.py), by the queen's own clock: starting, draining,
no worker, and which models would be served now."""

from __future__ import annotations

from protos.v1 import common_pb2, queen_pb2
from queen.registry import Registry, RegistrySettings
from queen.served import model_ready, routing_problem
from tests.fakes import FakeClock


def worker(worker_id: str, state: int = common_pb2.WORKER_STATE_IDLE) -> common_pb2.WorkerRecord:
    return common_pb2.WorkerRecord(
        id=worker_id, hive_id="h1", model="m", state=state,  # type: ignore[arg-type]
        slots_total=1, address=f"h1:{worker_id}",
    )  # fmt: skip


def heard(registry: Registry, *workers: common_pb2.WorkerRecord) -> None:
    registry.apply_heartbeat(queen_pb2.HiveHeartbeat(hive_id="h1", address="h1:1", workers=workers))


def test_a_new_queen_is_starting_until_its_hives_had_time_then_says_no_worker() -> None:
    clock = FakeClock()
    registry = Registry(clock, RegistrySettings(interval=1.0))
    assert routing_problem(registry, stopping=False) == (
        "starting: the hives have not all reported yet"
    )
    clock.advance(60)
    assert routing_problem(registry, stopping=False) == "no worker is registered"
    heard(registry, worker("a", common_pb2.WORKER_STATE_LOADING))
    assert routing_problem(registry, stopping=False) == "no worker is ready"
    heard(registry, worker("a"))
    assert routing_problem(registry, stopping=False) is None
    assert routing_problem(registry, stopping=True) == "draining: the queen is shutting down"


def test_a_ready_worker_routes_at_once_even_while_starting_and_busy_ones_count() -> None:
    clock = FakeClock()
    registry = Registry(clock, RegistrySettings(interval=1.0))
    heard(registry, worker("a", common_pb2.WORKER_STATE_BUSY))
    assert registry.warming_up() and routing_problem(registry, stopping=False) is None
    assert model_ready(registry, "m") and not model_ready(registry, "other")


def test_a_model_is_not_ready_on_drained_unreachable_or_silent_workers() -> None:
    clock = FakeClock()
    registry = Registry(clock, RegistrySettings(interval=1.0))
    heard(registry, worker("a"))
    registry.drain_worker("a", True)
    assert not model_ready(registry, "m")
    registry.drain_worker("a", False)
    registry.mark_unreachable("a")
    assert not model_ready(registry, "m")
    heard(registry, worker("a"))  # its hive lists it again
    assert model_ready(registry, "m")
    clock.advance(3.5)  # the hive went silent: unhealthy
    assert not model_ready(registry, "m")
    assert routing_problem(registry, stopping=False) == "no worker is ready"
